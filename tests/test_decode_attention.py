"""The Triton decode attention (``guard.decode_attention``) against the gather and a per-row SDPA.

Triton picks its interpreter when it is imported, from ``TRITON_INTERPRET=1``.
So on a machine without CUDA the ordinary run runs this file again in a child
process with the variable set (``test_the_kernel_in_triton_s_interpreter``):
nothing else in the run sees it, and each failure below shows in that test's
output. With CUDA (or with the variable set) the kernel tests run here, on the
compiled kernels.

The interpreter walks every program in numpy: sizes stay small, but every
path of the kernel is met (one split and several, a split past a row's
length, block and split boundaries, grouped heads 1, 2 and 4, head sizes 16
and 128, float32 and bfloat16), and the runner end to end on the tiny guard.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention

from guard import GuardEngine
from guard.attention import GatheredAttention
from guard.decode_attention import (
    TritonDecodeAttention,
    block_positions,
    decode_attention_unsupported,
    interpreting,
    split_plan,
    triton,
)
from guard.runner import ModelRunner
from guard.session import GuardSession
from tests.test_engine import assert_rounds_match_plain_sessions, assert_same
from tests.test_engine_pool import assert_graph_streams_match_plain_sessions, ids
from tests.triton_kernels import assert_passes_in_interpreter, compile_for_gpu

CUDA = torch.cuda.is_available()
KERNEL_HERE = triton is not None and (CUDA or interpreting())
DEVICE = "cuda" if CUDA and not interpreting() else "cpu"

if not KERNEL_HERE:

    def test_the_kernel_in_triton_s_interpreter():
        """Every test below, in a child process under ``TRITON_INTERPRET=1``."""
        if triton is None:
            pytest.skip("triton is not installed (the test extra installs it on Linux x86_64)")
        assert_passes_in_interpreter(__file__)

    @pytest.mark.parametrize(("capability", "dtype"), [(90, "bf16"), (90, "fp32"), (80, "bf16")])
    def test_the_kernels_compile_for_a_gpu(capability, dtype, tmp_path, monkeypatch):
        """The interpreter runs the kernels' Python, not Triton's compiler: compile
        both (to a cubin, with the wheel's ptxas; no GPU needed) at the 0.6B
        shape (16/8 heads of 128), with one split and with several."""
        if triton is None:
            pytest.skip("triton is not installed (the test extra installs it on Linux x86_64)")
        from guard import decode_attention

        monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compiled here, not found in a cache
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        types = {"partial": "*fp32", "lse": "*fp32", "bases": "*i64", "lengths": "*i64", "scale": "fp32"}
        types |= {name: f"*{dtype}" for name in ("query", "keys", "values", "output")}
        kernels = []
        for direct in (True, False):
            kernels.append((decode_attention._split_kernel, {
                "GROUP": 2, "BLOCK_G": 16, "BLOCK_N": block_positions(128, torch_dtype), "HEAD_DIM": 128,
                "DIRECT": direct, "FLOAT32_DOTS": dtype == "fp32",
            }))  # fmt: skip
        kernels.append((decode_attention._combine_kernel, {"BLOCK_S": 8, "HEAD_DIM": 128}))
        for kernel, values in kernels:
            every = {name: types.get(name, "i32") for name in kernel.arg_names if name not in values}
            compiled = compile_for_gpu(kernel, values, every, capability, num_warps=4, num_stages=2)
            shared = compiled.metadata.shared
            assert shared <= 227 * 1024, f"{shared} bytes of shared memory: more than a Hopper SM gives a block"

    def test_the_runner_refuses_the_kernel_where_it_cannot_run(tiny_guard):
        with pytest.raises(ValueError, match=r"interpreter .*use attention='gather'"):
            ModelRunner(tiny_guard, attention="triton")
        assert ModelRunner(tiny_guard).attention == "gather"  # "auto" on the CPU

else:
    # numpy's, from inside the interpreter: noise.
    pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

    def per_row_sdpa(query, keys, values, base, length, scale) -> torch.Tensor:
        """Each row alone, in float32: SDPA over ``keys[base:base + length]``, grouped heads."""
        rows, heads, head_dim = query.shape
        out = []
        for r in range(rows):
            start, end = int(base[r]), int(base[r] + length[r])
            own_keys = keys[start:end].float().transpose(0, 1)[None]
            own_values = values[start:end].float().transpose(0, 1)[None]
            attended = scaled_dot_product_attention(
                query[r].float()[None, :, None], own_keys, own_values, scale=scale, enable_gqa=True
            )
            out.append(attended.reshape(heads * head_dim))
        return torch.stack(out)

    ROWS = 12

    def lengths_for(span: int, chunk: int, block: int, generator: torch.Generator) -> list[int]:
        """1, block and split boundaries (both sides), several splits, the span itself; random ones to ``ROWS``."""
        wanted = [1, block - 1, block, block + 1, chunk - 1, chunk, chunk + 1, 2 * chunk + 3, span - 1, span]
        lengths = sorted({min(span, max(1, n)) for n in wanted})
        return lengths + torch.randint(1, span + 1, (ROWS - len(lengths),), generator=generator).tolist()

    # Every pair of (dtype, group, head_dim) values meets once: the interpreter is slow.
    @pytest.mark.parametrize(
        ("dtype", "group", "head_dim"),
        [(torch.float32, 1, 16), (torch.float32, 2, 128), (torch.float32, 4, 16),
         (torch.bfloat16, 1, 128), (torch.bfloat16, 2, 16), (torch.bfloat16, 4, 128)],
    )  # fmt: skip
    def test_the_kernel_matches_the_gather_and_each_row_alone(dtype, group, head_dim):
        generator = torch.Generator().manual_seed(group * 1000 + head_dim)
        kv_heads = 2
        heads = kv_heads * group
        block = block_positions(head_dim, dtype)
        for span in (block, 6 * block):  # one split (the kernel writes the output), then 3 (and a combine)
            splits, chunk = split_plan(ROWS, kv_heads, span, block)
            assert splits == (1 if span == block else 3)
            lengths = lengths_for(span, chunk, block, generator)
            capacity = 3 * span
            keys, values = (
                torch.randn(capacity, kv_heads, head_dim, generator=generator).to(dtype).to(DEVICE) for _ in range(2)
            )
            query = torch.randn(ROWS, heads, head_dim, generator=generator).to(dtype).to(DEVICE)
            length = torch.tensor(lengths, device=DEVICE)
            # Regions anywhere in the pool: different bases, some overlapping, one at the very end.
            starts = torch.randint(0, capacity - span + 1, (ROWS,), generator=generator)
            base = (starts.to(DEVICE) + span - length).clamp_(max=capacity - length)
            base[0] = capacity - length[0]
            scale = head_dim**-0.5
            ours = TritonDecodeAttention(base, length, span, capacity)(query, keys, values, scale)
            assert ours.dtype == dtype and ours.shape == (ROWS, heads * head_dim)
            assert torch.isfinite(ours).all()  # splits past a row's length (length 1) add nothing, and no NaN
            gathered = GatheredAttention(base, length, span, capacity)(query, keys, values, scale)
            alone = per_row_sdpa(query, keys, values, base, length, scale)
            if dtype == torch.float32:
                torch.testing.assert_close(ours, alone, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(ours, gathered, atol=1e-5, rtol=1e-5)
            else:  # rounded to bfloat16 (and the softmax weights too, as on the tensor cores)
                torch.testing.assert_close(ours.float(), alone, atol=2e-2, rtol=2e-2)
                torch.testing.assert_close(ours.float(), gathered.float(), atol=3e-2, rtol=3e-2)

    def test_the_split_plan_depends_on_the_shapes_only():
        block = block_positions(128, torch.bfloat16)
        assert block == 64 and block_positions(128, torch.float32) == 32 and block_positions(16, torch.float32) == 64
        assert block_positions(256, torch.float32) == 16
        for rows in (1, 2, 16, 64, 256):
            for span in (64, 96, 1024, 4096, 6144):
                splits, chunk = split_plan(rows, 8, span, block)
                assert chunk % block == 0 and (splits - 1) * chunk < span <= splits * chunk and 1 <= splits <= 32
        assert split_plan(1, 8, 4096, 64)[0] > 8 and split_plan(256, 8, 4096, 64)[0] == 1

    @pytest.mark.parametrize("head_dim", [8, 24, 100, 512])
    def test_unsupported_head_sizes_are_refused_with_a_reason(head_dim):
        assert "power of two from 16 to 256" in decode_attention_unsupported(head_dim, DEVICE)
        query = torch.zeros(1, 2, head_dim, device=DEVICE)
        keys = torch.zeros(4, 1, head_dim, device=DEVICE)
        one = torch.ones(1, dtype=torch.long, device=DEVICE)
        attention = TritonDecodeAttention(one - 1, one, 4, 4)
        with pytest.raises(ValueError, match=f"power of two from 16 to 256, got {head_dim}"):
            attention(query, keys, keys, 1.0)

    # --- the runner on the kernel -------------------------------------------------------------------------

    @pytest.fixture(scope="module")
    def kernel_guard(tiny_guard, tiny_checkpoint):
        """The tiny guard where the kernel runs: the CPU one in the interpreter, else a CUDA one (float32)."""
        if DEVICE == "cpu":
            return tiny_guard
        from guard import StreamGuard

        return StreamGuard.from_pretrained(tiny_checkpoint, device="cuda", dtype="float32")

    def test_engine_streams_on_the_kernel_match_plain_sessions(kernel_guard, tiny_guard):
        """Decode steps of several streams, padded to a row bucket, on the graph path's fixed shapes."""
        with GuardEngine(kernel_guard, graphs="eager", attention="triton", max_wait_ms=20) as engine:
            assert engine._runner.attention == "triton"
            assert_graph_streams_match_plain_sessions(engine, tiny_guard, [ids(40 + n, 8) for n in range(3)])

    def test_a_session_on_the_kernel_matches_a_plain_session_with_rollbacks(kernel_guard, tiny_guard):
        for graphs in ("eager", "off"):  # the fixed-shape path, then the eager step (prompt chunks in place)
            runner = ModelRunner(kernel_guard, graphs=graphs, attention="triton")
            runner.in_place_from = None
            on_kernel, plain = GuardSession(kernel_guard, runner=runner), tiny_guard.session()
            for session in (on_kernel, plain):
                session.said = [session.moderate_prompt("kernel"), *session.append(ids(41, 6))]
                session.said += [v for i in ids(42, 4) for v in session.append(i)]
                session.rollback(session.response_start + 3)
                session.said += session.append(ids(43, 2)) + session.finish()
            assert_same(on_kernel.said, plain.said)

    def test_interleaved_rounds_on_the_kernel_match_plain_sessions(kernel_guard):
        """Sessions sharing steps with appends of several ids (causal rows of one segment) and rollbacks."""
        rounds = [
            [("append", ids(50, 3)), ("append", [7]), ("append", ids(51, 9))],
            [("rollback", 0.5), ("append", ids(52, 2)), ("append", [9])],
        ]
        with GuardEngine(kernel_guard, graphs="off", attention="triton", prefill_chunk=8, max_wait_ms=20) as engine:
            engine._runner.in_place_from = None
            assert_rounds_match_plain_sessions(engine, ["a b", "? ab", "b"], rounds)
