"""Decode attention over the KV pool in place: a Triton kernel (flash-decoding).

``TritonDecodeAttention`` is a drop-in for ``guard.attention.GatheredAttention``
(the same construction from a step's region bases and lengths, the same call
per layer) that reads each row's keys and values where the pool holds them,
instead of gathering ``span`` slots per row into a copy first. The gather
reads the KV once and writes and reads it again; this reads it once (for
every query head grouped on a key/value head).

How it works: the grid is (rows, kv_heads, splits). A program takes one key/
value head and every query head grouped on it (the group's queries padded to
16 rows for ``tl.dot``), walks one chunk of the row's positions in blocks of
``BLOCK_N`` slots from the region's base, and keeps an online softmax in
float32; positions at or past the row's length are masked, so rows of one
session's several new tokens are causal. With one split the program writes
the output; otherwise each split writes its partial output and log-sum-exp,
and a second kernel combines the splits (a split whose chunk lies past the
row's length has weight zero). The number of splits depends only on (rows,
span, kv_heads, head_dim, dtype): never on the lengths, and nothing syncs
with the host, so a CUDA graph can hold it (``guard.step_graphs``).

On CUDA the kernels are compiled by ``triton.jit``. On the CPU they run only
in Triton's interpreter, which triton chooses when it is imported, from
``TRITON_INTERPRET=1`` (the tests set it in a child process, never where a
GPU run would see it); it is slow, and its dots multiply 16-bit tensors' raw
bits, so there the kernel widens them to float32 first (``FLOAT32_DOTS``).
``"auto"`` in ``guard.runner`` takes the kernel on CUDA only.

Measured: nothing on a GPU yet (``benchmarks/gpu_check.py`` checks it against
the gather at the real shape and times both); on the CPU the interpreter's
results are checked against the gather and a per-row SDPA
(``tests/test_decode_attention.py``).
"""

from __future__ import annotations

import functools
import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the runner falls back to the gather
    triton = tl = None

__all__ = ["TritonDecodeAttention", "decode_attention_unsupported"]

#: Programs a step's kernel aims at (rows x kv_heads x splits): a few waves on
#: an H100/H200's 132 SMs, each holding several programs at once.
TARGET_PROGRAMS = 1024
#: At most this many splits (the combine holds splits x head_dim in registers).
MAX_SPLITS = 32
#: A split walks at least this many blocks of positions.
MIN_BLOCKS_PER_SPLIT = 2
#: Bytes of one key (or value) block a program loads per loop iteration: 64
#: positions of head_dim 128 in bf16. Loads are double-buffered in shared
#: memory (num_stages=2): keys and values, 2 x 2 x 16 KiB = 64 KiB.
BLOCK_BYTES = 16 * 1024
#: The group's query heads are padded to this many rows (``tl.dot``'s M on tensor cores).
MIN_GROUP_ROWS = 16
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def decode_attention_unsupported(head_dim: int, device: torch.device | str) -> str | None:
    """Why the kernel cannot serve this head size on this device, or None if it can."""
    if triton is None:
        return "triton is not installed (it comes with torch's CUDA wheels on Linux; pip install triton)"
    if not (16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0):
        return f"the Triton decode attention needs a head_dim that is a power of two from 16 to 256, got {head_dim}"
    kind = torch.device(device).type
    if kind == "cpu" and not interpreting():
        return "on the CPU the Triton decode attention runs only in Triton's interpreter (TRITON_INTERPRET=1)"
    if kind not in ("cuda", "cpu"):
        return f"the Triton decode attention runs on CUDA, not on {kind}"
    return None


def _decode_split(
    query, keys, values, bases, lengths, output, partial, lse,
    scale,  # the softmax scale times log2(e): the kernel works in base 2
    query_row_stride, query_head_stride, key_slot_stride, key_head_stride, value_slot_stride, value_head_stride,
    output_row_stride, span, chunk,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    DIRECT: tl.constexpr, FLOAT32_DOTS: tl.constexpr,
):  # fmt: skip
    """One (row, kv head, split): the group's heads over one chunk of the row's positions.

    ``FLOAT32_DOTS``: float32 inputs take IEEE float32 dots (not TF32, which
    rounds the inputs to 10 bits); and in the interpreter, whose dots multiply
    bfloat16 / float16 tensors' raw bits (triton 3.6), 16-bit inputs are
    widened first: the same products, exact in float32."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    heads = kv_head * GROUP + tl.arange(0, BLOCK_G)
    real_heads = tl.arange(0, BLOCK_G) < GROUP
    dims = tl.arange(0, HEAD_DIM)
    base = tl.load(bases + row).to(tl.int64)
    length = tl.minimum(tl.load(lengths + row).to(tl.int32), span)
    start = split * chunk
    end = tl.minimum(start + chunk, length)

    query_at = query + row * query_row_stride + heads[:, None] * query_head_stride + dims[None, :]
    q = tl.load(query_at, mask=real_heads[:, None], other=0.0)  # [BLOCK_G, HEAD_DIM]; padding heads are zeros
    top = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    accumulated = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    offsets = tl.arange(0, BLOCK_N)
    for first in range(start, end, BLOCK_N):
        positions = first + offsets
        valid = positions < end
        slots = base + positions
        # Keys loaded transposed, [HEAD_DIM, BLOCK_N]; values [BLOCK_N, HEAD_DIM].
        k = tl.load(keys + slots[None, :] * key_slot_stride + kv_head * key_head_stride + dims[:, None],
                    mask=valid[None, :], other=0.0)  # fmt: skip
        if FLOAT32_DOTS:
            scores = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
        else:
            scores = tl.dot(q, k)
        scores = tl.where(valid[None, :], scores * scale, float("-inf"))
        # The block holds at least one valid position: new_top is finite, no NaN below.
        new_top = tl.maximum(top, tl.max(scores, 1))
        rescale = tl.exp2(top - new_top)
        weights = tl.exp2(scores - new_top[:, None])
        total = total * rescale + tl.sum(weights, 1)
        v = tl.load(values + slots[:, None] * value_slot_stride + kv_head * value_head_stride + dims[None, :],
                    mask=valid[:, None], other=0.0)  # fmt: skip
        if FLOAT32_DOTS:  # the weights rounded to the values' dtype all the same, as on the tensor cores
            products = tl.dot(weights.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
            accumulated = accumulated * rescale[:, None] + products
        else:
            accumulated = accumulated * rescale[:, None] + tl.dot(weights.to(v.dtype), v)
        top = new_top

    seen = total > 0  # false only for a split whose chunk lies past the row's length
    attended = accumulated / tl.where(seen, total, 1.0)[:, None]
    if DIRECT:  # one split: the output itself
        output_at = output + row * output_row_stride + heads[:, None] * HEAD_DIM + dims[None, :]
        tl.store(output_at, attended.to(output.dtype.element_ty), mask=real_heads[:, None])
    else:
        splits = tl.num_programs(2)
        at = (row * tl.num_programs(1) * GROUP + heads) * splits + split  # [rows, heads, splits]
        tl.store(lse + at, tl.where(seen, top + tl.log2(tl.where(seen, total, 1.0)), float("-inf")), mask=real_heads)
        tl.store(partial + at[:, None] * HEAD_DIM + dims[None, :], attended, mask=real_heads[:, None])


def _decode_combine(partial, lse, output, output_row_stride, splits, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One (row, head): the splits' partial outputs weighed by their log-sum-exp."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    index = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, HEAD_DIM)
    at = (row * tl.num_programs(1) + head) * splits + index
    present = index < splits
    sums = tl.load(lse + at, mask=present, other=float("-inf"))
    top = tl.max(sums, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # no split saw a position: every weight is 0, no NaN
    weights = tl.exp2(sums - top)
    parts = tl.load(partial + at[:, None] * HEAD_DIM + dims[None, :], mask=present[:, None], other=0.0)
    weight = tl.sum(weights, 0)
    attended = tl.sum(weights[:, None] * parts, 0) / tl.where(weight > 0, weight, 1.0)
    tl.store(output + row * output_row_stride + head * HEAD_DIM + dims, attended.to(output.dtype.element_ty))


if triton is not None:  # on the CPU, under TRITON_INTERPRET=1 (read when triton is imported), interpreted
    from triton.runtime.interpreter import InterpretedFunction

    _split_kernel = triton.jit(_decode_split)
    _combine_kernel = triton.jit(_decode_combine)
    _INTERPRETED = isinstance(_split_kernel, InterpretedFunction)


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1`` when triton was imported)."""
    return triton is not None and _INTERPRETED


@functools.cache
def _refusal(head_dim: int, device: torch.device, dtype: torch.dtype) -> str | None:
    reason = decode_attention_unsupported(head_dim, device)
    if reason is None and dtype not in SUPPORTED_DTYPES:
        reason = f"the Triton decode attention takes float32, bfloat16 or float16, not {dtype}"
    return reason


@functools.cache
def block_positions(head_dim: int, dtype: torch.dtype) -> int:
    """Positions per loop iteration: ``BLOCK_BYTES`` of keys, 16 to 64 positions."""
    return max(16, min(64, BLOCK_BYTES // (head_dim * dtype.itemsize)))


@functools.cache
def split_plan(rows: int, kv_heads: int, span: int, block_n: int) -> tuple[int, int]:
    """(splits, chunk positions per split): from the static shapes only."""
    blocks = -(-span // block_n)
    wanted = -(-TARGET_PROGRAMS // (rows * kv_heads))
    splits = max(1, min(wanted, blocks // MIN_BLOCKS_PER_SPLIT, MAX_SPLITS))
    chunk = -(-blocks // splits) * block_n
    return -(-span // chunk), chunk


class TritonDecodeAttention:
    """Attention of ``rows`` token rows, each over ``length[r]`` positions of
    the pool from ``base[r]``, read in place; built once per step, called once
    per layer (``GatheredAttention``'s interface)."""

    def __init__(self, base: torch.Tensor, length: torch.Tensor, span: int, capacity: int) -> None:
        if triton is None:
            raise ValueError(decode_attention_unsupported(16, base.device))
        self.base, self.length = base.contiguous(), length.contiguous()
        self.rows, self.span, self.capacity = base.shape[0], span, capacity

    def __call__(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
        """``query`` ``[rows, heads, head_dim]`` → ``[rows, heads * head_dim]``, in the query's dtype."""
        rows, heads, head_dim = query.shape
        kv_heads = keys.shape[1]
        reason = _refusal(head_dim, query.device, query.dtype)
        if reason is None and keys.dtype != query.dtype:
            reason = f"keys are {keys.dtype} and queries {query.dtype}: the kernel takes one dtype"
        if reason is not None:
            raise ValueError(reason)
        if query.stride(2) != 1:
            query = query.contiguous()
        if keys.stride(2) != 1 or values.stride(2) != 1:
            raise ValueError("keys and values must be contiguous along head_dim (views of the KV pool's storage)")
        group = heads // kv_heads
        block_n = block_positions(head_dim, keys.dtype)
        splits, chunk = split_plan(rows, kv_heads, self.span, block_n)
        output = query.new_empty((rows, heads * head_dim))
        direct = splits == 1
        if direct:
            partial = lse = output  # unused
        else:
            partial = torch.empty((rows, heads, splits, head_dim), dtype=torch.float32, device=query.device)
            lse = torch.empty((rows, heads, splits), dtype=torch.float32, device=query.device)
        _split_kernel[(rows, kv_heads, splits)](
            query, keys, values, self.base, self.length, output, partial, lse,
            scale * math.log2(math.e),
            query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
            output.stride(0), self.span, chunk,
            GROUP=group, BLOCK_G=max(MIN_GROUP_ROWS, triton.next_power_of_2(group)), BLOCK_N=block_n,
            HEAD_DIM=head_dim, DIRECT=direct, FLOAT32_DOTS=query.dtype == torch.float32 or _INTERPRETED,
            num_warps=4, num_stages=2,
        )  # fmt: skip
        if not direct:
            _combine_kernel[(rows, heads)](
                partial, lse, output, output.stride(0), splits,
                BLOCK_S=triton.next_power_of_2(splits), HEAD_DIM=head_dim, num_warps=4,
            )  # fmt: skip
        return output
