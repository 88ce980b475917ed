"""The guard's layers with fewer kernels: Triton for the pointwise work, one matmul per projection group.

transformers' Qwen3 layer, as ``ModelRunner.layers`` runs it, launches 58
kernels per layer for a one-row bf16 decode step (counted by
``benchmarks/fused_check.py``; 3 of them the gathered attention): each
``Qwen3RMSNorm`` is eight (to fp32, pow, mean, add, rsqrt, mul, to bf16,
the weight's mul) and a layer has four (input, q_norm, k_norm,
post-attention); rotary is five each for q and k; q, k, v, o, gate, up and
down are seven matmuls; the two residual adds, SiLU, its product and the two
KV pool writes make the rest. Inside a CUDA graph each still costs a few
microseconds, so a 28-layer decode step is bound by their count, not by
the GPU's arithmetic. Here a layer is 11 (8 besides attention):

1. ``add_rms_norm``: the previous layer's MLP output added to the residual,
   and the input norm, in one kernel (the first layer: the norm alone);
2. one matmul for q, k and v (their weights concatenated);
3. ``qk_norm_rope_store``: q_norm and k_norm per head, rotary for both, the
   query written out and the new keys and values written into the KV pool at
   the step's slots, in one kernel;
4. attention (whatever ``attend`` the runner passes) and ``o_proj``;
5. ``add_rms_norm``: the residual add and the post-attention norm;
6. one matmul for gate and up, ``silu_mul`` (one kernel), ``down_proj``.

The arithmetic is transformers' own, rounding where it rounds:
RMSNorm's variance and scaling in fp32, cast to the input dtype, then the
weight's multiply in the input dtype; rotary's ``q * cos``, ``rotate_half(q)
* sin`` and their sum each rounded to the model's dtype; the residual adds
and ``silu(gate)`` and ``* up`` in the model's dtype. Each kernel computes
in fp32 and rounds to the model's dtype at exactly those points, so in bf16
its outputs equal torch's except where an fp32 result differs in its last
bits (the variance's summation order, the GPU's approximate ``exp`` and
``rsqrt``) and that moves a bf16 rounding: one bf16 ulp, rarely. The
stacked matmuls compute every output from the same row and column as the
separate ones, but the BLAS may pick another kernel, so another summation
order, for the wider matrix: the same last-bit kind of difference.

The concatenated weights are built once per model (``stacked_projections``)
and the model's own ``q_proj``/``k_proj``/``v_proj``/``gate_proj``/``up_proj``
weights become views into them: same values, no second copy (for the 0.6B
guard a copy would be 0.59 GB in bf16). ``guard.runner`` imports this module
only when a runner may fuse (on CUDA, or ``fused="on"``), so that Triton's
interpreter (``TRITON_INTERPRET=1``, read when a kernel is decorated) can
run these kernels on the CPU in the tests.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.nn.functional import linear
from triton.runtime.interpreter import InterpretedFunction

__all__ = [
    "INTERPRETED",
    "FusedLayers",
    "StackedProjections",
    "add_rms_norm",
    "qk_norm_rope_store",
    "rms_norm",
    "silu_mul",
    "stacked_projections",
    "unfusable_reason",
]


# --- kernels -----------------------------------------------------------------------------------------------


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` (to nearest, ties to even), as fp32. By
    hand for bf16: Triton's CPU interpreter truncates in that conversion."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, hidden_ptr, weight_ptr, out_ptr,
    x_stride, residual_stride, hidden_stride, out_stride,
    width, eps,
    BLOCK: tl.constexpr, ADD: tl.constexpr,
):  # fmt: skip
    """One row: (``hidden = residual + x``, stored) then ``weight * rms_norm(hidden)``."""
    row = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK)
    inside = columns < width
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * x_stride + columns, mask=inside, other=0.0)
    if ADD:
        residual = tl.load(residual_ptr + row * residual_stride + columns, mask=inside, other=0.0)
        x = _rounded(residual.to(tl.float32) + x.to(tl.float32), dtype)  # the residual add, rounded as torch's
        tl.store(hidden_ptr + row * hidden_stride + columns, x.to(dtype), mask=inside)
    x = x.to(tl.float32)
    variance = tl.sum(x * x, axis=0) / width
    normed = _rounded(x * tl.rsqrt(variance + eps), dtype)
    weight = tl.load(weight_ptr + columns, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + columns, _rounded(weight * normed, dtype).to(dtype), mask=inside)


@triton.jit
def _norm_rope(
    heads_ptr, count, weight_ptr, eps, cos, sin, HEAD_DIM: tl.constexpr, BLOCK_HEADS: tl.constexpr, dtype: tl.constexpr
):
    """``count`` heads ``[count, HEAD_DIM]`` from ``heads_ptr``: ``weight * rms_norm(head)``
    with rotary applied, in transformers' roundings; the offsets and mask of the block."""
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    dims = tl.arange(0, HEAD_DIM)[None, :]
    half: tl.constexpr = HEAD_DIM // 2
    partner = tl.where(dims < half, dims + half, dims - half)  # rotate_half reads the other half of the head
    inside = (heads < count) & (dims < HEAD_DIM)
    x = tl.load(heads_ptr + heads * HEAD_DIM + dims, mask=inside, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)[:, None]
    x_partner = tl.load(heads_ptr + heads * HEAD_DIM + partner, mask=inside, other=0.0).to(tl.float32)
    weight = tl.load(weight_ptr + dims).to(tl.float32)
    weight_partner = tl.load(weight_ptr + partner).to(tl.float32)
    normed = _rounded(weight * _rounded(x * rstd, dtype), dtype)
    rotated = tl.where(dims < half, -1.0, 1.0) * _rounded(weight_partner * _rounded(x_partner * rstd, dtype), dtype)
    rope = _rounded(_rounded(normed * cos, dtype) + _rounded(rotated * sin, dtype), dtype).to(dtype)
    return rope, heads * HEAD_DIM + dims, inside


@triton.jit
def _qk_norm_rope_store_kernel(
    qkv_ptr, qkv_stride, q_weight_ptr, k_weight_ptr, cos_ptr, sin_ptr, cos_stride,
    query_ptr, keys_ptr, values_ptr, slots_ptr, slot_stride, q_eps, k_eps,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_HEADS: tl.constexpr,
):  # fmt: skip
    """Program (token, 0): the query heads of one qkv row; (token, 1): its key and value heads."""
    token = tl.program_id(0).to(tl.int64)
    row_ptr = qkv_ptr + token * qkv_stride
    dims = tl.arange(0, HEAD_DIM)
    cos = tl.load(cos_ptr + token * cos_stride + dims).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + token * cos_stride + dims).to(tl.float32)[None, :]
    dtype = query_ptr.dtype.element_ty
    if tl.program_id(1) == 0:
        query, offsets, inside = _norm_rope(row_ptr, HEADS, q_weight_ptr, q_eps, cos, sin, HEAD_DIM, BLOCK_HEADS, dtype)
        tl.store(query_ptr + token * (HEADS * HEAD_DIM) + offsets, query, mask=inside)
    else:
        keys_from = row_ptr + HEADS * HEAD_DIM
        key, offsets, inside = _norm_rope(
            keys_from, KV_HEADS, k_weight_ptr, k_eps, cos, sin, HEAD_DIM, BLOCK_HEADS, dtype
        )
        slot = tl.load(slots_ptr + token)  # the pool's [kv_heads, head_dim] at a slot are contiguous
        tl.store(keys_ptr + slot * slot_stride + offsets, key, mask=inside)
        value = tl.load(keys_from + KV_HEADS * HEAD_DIM + offsets, mask=inside)
        tl.store(values_ptr + slot * slot_stride + offsets, value, mask=inside)


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, gate_up_stride, out_stride, width, BLOCK: tl.constexpr):
    """``silu(gate) * up`` over one block of one row of ``[gate | up]``."""
    row = tl.program_id(0).to(tl.int64)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = columns < width
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_up_ptr + row * gate_up_stride + columns, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * gate_up_stride + width + columns, mask=inside, other=0.0).to(tl.float32)
    activated = _rounded(gate / (1.0 + tl.exp(-gate)), dtype)  # torch's silu: x / (1 + exp(-x))
    tl.store(out_ptr + row * out_stride + columns, _rounded(activated * up, dtype).to(dtype), mask=inside)


#: The kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` when this module was imported).
INTERPRETED = isinstance(_rms_norm_kernel, InterpretedFunction)


# --- launchers ---------------------------------------------------------------------------------------------


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """The kernels step over rows by their stride and along a row by 1 (what linear's outputs are)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _warps(block: int) -> int:
    return max(1, min(8, block // 256))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``Qwen3RMSNorm`` over the last dim of ``x`` ``[rows, width]``."""
    x = _unit_stride(x)
    rows, width = x.shape
    out = torch.empty_like(x)
    block = triton.next_power_of_2(width)
    _rms_norm_kernel[(rows,)](
        x, x, x, weight, out, x.stride(0), 0, 0, out.stride(0), width, eps,
        BLOCK=block, ADD=False, num_warps=_warps(block),
    )  # fmt: skip
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """``hidden = residual + x`` and ``Qwen3RMSNorm(hidden)``, both ``[rows, width]``, in one kernel."""
    x, residual = _unit_stride(x), _unit_stride(residual)
    rows, width = x.shape
    hidden, out = torch.empty_like(x), torch.empty_like(x)
    block = triton.next_power_of_2(width)
    _rms_norm_kernel[(rows,)](
        x, residual, hidden, weight, out, x.stride(0), residual.stride(0), hidden.stride(0), out.stride(0),
        width, eps, BLOCK=block, ADD=True, num_warps=_warps(block),
    )  # fmt: skip
    return hidden, out


def qk_norm_rope_store(
    qkv: torch.Tensor,
    heads: int,
    kv_heads: int,
    q_norm: torch.nn.Module,
    k_norm: torch.nn.Module,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    """From ``qkv`` ``[tokens, (heads + 2 kv_heads) * head_dim]``: the normed,
    rotated query ``[tokens, heads, head_dim]``; the normed, rotated keys and
    the values written into ``keys``/``values`` ``[capacity, kv_heads,
    head_dim]`` at ``slots`` (what ``index_copy_`` did). ``cos``/``sin``:
    ``[tokens, head_dim]``, the model's rotary embedding; ``head_dim`` a
    power of 2 (``unfusable_reason``)."""
    qkv = _unit_stride(qkv)
    tokens = qkv.shape[0]
    head_dim = keys.shape[2]
    if keys.stride()[1:] != (head_dim, 1) or values.stride() != keys.stride():
        raise ValueError("qk_norm_rope_store needs keys and values of contiguous [kv_heads, head_dim] slots")
    query = qkv.new_empty((tokens, heads, head_dim))
    _qk_norm_rope_store_kernel[(tokens, 2)](
        qkv, qkv.stride(0), q_norm.weight, k_norm.weight, cos, sin, cos.stride(0),
        query, keys, values, slots, keys.stride(0), q_norm.variance_epsilon, k_norm.variance_epsilon,
        HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_HEADS=triton.next_power_of_2(max(heads, kv_heads)),
        num_warps=4,
    )  # fmt: skip
    return query


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up`` ``[rows, 2 * width]`` (gate first): ``[rows, width]``."""
    gate_up = _unit_stride(gate_up)
    rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty((rows, width))
    block = min(1024, triton.next_power_of_2(width))
    _silu_mul_kernel[(rows, triton.cdiv(width, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), width, BLOCK=block, num_warps=_warps(block)
    )
    return out


# --- the concatenated weights ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StackedProjections:
    """One layer's ``[q; k; v]`` (and bias, if the model has one) and ``[gate; up]`` weights."""

    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    gate_up: torch.Tensor


_STACKED: weakref.WeakKeyDictionary[torch.nn.Module, list[StackedProjections]] = weakref.WeakKeyDictionary()
_STACKING = threading.Lock()


def stacked_projections(model: torch.nn.Module) -> list[StackedProjections]:
    """The concatenated projection weights of every layer of ``model`` (a
    ``Qwen3ForGuardModel``), built once per model; its own projections' weights
    become views into them (same values, so every other runner and
    ``model(...)`` compute as before).

    Call it before any CUDA graph reads the model's weights: the weights'
    old storage is freed, and a graph captured on it would read freed
    memory. ``ModelRunner`` calls it when it is built, on CUDA whether it
    fuses or not, before its first step, so no runner's graph ever saw the
    old storage."""
    # Ordinary tensors even when called under inference mode: the model's weights are used outside it too.
    with _STACKING, torch.inference_mode(False):
        stacked = _STACKED.get(model)
        if stacked is None:
            stacked = _STACKED[model] = [_stack(layer) for layer in model.model.layers]
        return stacked


@torch.no_grad()
def _stack(layer: torch.nn.Module) -> StackedProjections:
    attention, mlp = layer.self_attn, layer.mlp
    qkv_linears = [attention.q_proj, attention.k_proj, attention.v_proj]
    qkv = _concatenate_into(qkv_linears, "weight")
    biases = [linear_.bias for linear_ in qkv_linears]
    qkv_bias = _concatenate_into(qkv_linears, "bias") if all(b is not None for b in biases) else None
    return StackedProjections(qkv, qkv_bias, _concatenate_into([mlp.gate_proj, mlp.up_proj], "weight"))


def _concatenate_into(linears: list[torch.nn.Linear], name: str) -> torch.Tensor:
    parameters = [getattr(linear_, name) for linear_ in linears]
    stacked = torch.cat([parameter.detach() for parameter in parameters])
    first = 0
    for parameter in parameters:
        rows = parameter.shape[0]
        parameter.data = stacked[first : first + rows]  # the same values, now a view: one copy in memory
        first += rows
    return stacked


# --- the layers --------------------------------------------------------------------------------------------


def unfusable_reason(model: torch.nn.Module) -> str | None:
    """Why these kernels cannot run ``model``'s layers (None: they can)."""
    config = model.config
    head_dim = model.model.layers[0].self_attn.head_dim
    if head_dim & (head_dim - 1):
        return f"head_dim {head_dim} (the fused rotary kernel needs a power of 2)"
    if config.hidden_act not in ("silu", "swish"):
        return f"hidden_act {config.hidden_act!r} (the fused MLP computes SiLU)"
    if getattr(config, "mlp_bias", False):
        return "mlp_bias (the fused MLP has no bias)"
    return None


class FusedLayers:
    """``ModelRunner.layers`` with the kernels above (see the module docstring)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.stacked = stacked_projections(model)

    def __call__(self, ids, positions, slots, attend, storage, layer_count: int) -> torch.Tensor:
        if ids.device.type != "cuda" or ids.device.index == torch.cuda.current_device():
            return self._layers(ids, positions, slots, attend, storage, layer_count)
        with torch.cuda.device(ids.device):  # Triton launches on the current device, not on its tensors'
            return self._layers(ids, positions, slots, attend, storage, layer_count)

    def _layers(self, ids, positions, slots, attend, storage, layer_count: int) -> torch.Tensor:
        backbone = self.model.model
        config = self.model.config
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        hidden = backbone.embed_tokens(ids)  # [tokens, hidden]
        cos, sin = backbone.rotary_emb(hidden, positions[None])
        cos, sin = cos[0], sin[0]
        added = None  # the previous layer's MLP output, not yet added to the residual
        for index, layer in enumerate(backbone.layers[:layer_count]):
            attention, stacked = layer.self_attn, self.stacked[index]
            norm = layer.input_layernorm
            if added is None:
                normed = rms_norm(hidden, norm.weight, norm.variance_epsilon)
            else:
                hidden, normed = add_rms_norm(added, hidden, norm.weight, norm.variance_epsilon)
            keys, values = storage[index, 0], storage[index, 1]
            query = qk_norm_rope_store(
                linear(normed, stacked.qkv, stacked.qkv_bias), heads, kv_heads, attention.q_norm, attention.k_norm,
                cos, sin, keys, values, slots,
            )  # fmt: skip
            attended = attend(query, keys, values, attention.scaling)
            norm = layer.post_attention_layernorm
            hidden, normed = add_rms_norm(attention.o_proj(attended), hidden, norm.weight, norm.variance_epsilon)
            added = layer.mlp.down_proj(silu_mul(linear(normed, stacked.gate_up)))
        norm = backbone.norm
        if added is None:
            return rms_norm(hidden, norm.weight, norm.variance_epsilon)
        return add_rms_norm(added, hidden, norm.weight, norm.variance_epsilon)[1]
