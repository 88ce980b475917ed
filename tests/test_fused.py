"""The fused layers (``guard.fused``) against the torch code they replace.

Triton picks its interpreter when a kernel is decorated, from
``TRITON_INTERPRET=1``. So on a machine without CUDA the ordinary run runs
this file again in a child process with the variable set
(``test_the_kernels_in_triton_s_interpreter``): nothing else in the run sees
it, and each failure below shows in that test's output. With CUDA (or with
the variable set) the tests run here, on the compiled kernels.

Tolerances: in float32 every kernel computes what torch computes, in another
order (the variance's sum; on a GPU, approximate ``exp`` and ``rsqrt``):
a few float32 ulps. In bfloat16 they round to bf16 exactly where torch does
(``guard.fused``'s docstring), so an output differs from torch's only when
one of those float32 differences moves a bf16 rounding: at most one bf16 ulp.
The interpreter walks every program in numpy, so sizes stay small; they
cover one token and several, 17 rows, head sizes 16 and 128, widths 64 and
1,024 and a width that is not a multiple of the block.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3RMSNorm,
    Qwen3RotaryEmbedding,
    apply_rotary_pos_emb,
)

from guard.runner import ModelRunner, Segment
from guard.session import GuardSession
from tests.test_engine import assert_same
from tests.test_engine_pool import ids
from tests.triton_kernels import assert_passes_in_interpreter, compile_for_gpu

CUDA = torch.cuda.is_available()
HERE = CUDA or os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
DTYPES = [torch.float32, torch.bfloat16]


def bf16_ulps(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """The largest difference, in bf16 ulps of ``theirs``."""
    theirs = theirs.float()
    ulp = torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(theirs.abs().clamp_min(1e-30))))
    return ((ours.float() - theirs).abs() / ulp).max().item()


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    if ours.dtype == torch.float32:
        torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=2e-6)
    else:
        assert bf16_ulps(ours, theirs) <= 1


def random_norm(width: int, dtype: torch.dtype, eps: float = 1e-6) -> Qwen3RMSNorm:
    norm = Qwen3RMSNorm(width, eps=eps)
    norm.weight.data = torch.randn(width) * 0.5 + 1
    return norm.to(DEVICE, dtype)


if not HERE:

    def test_the_kernels_in_triton_s_interpreter():
        """Every test below, in a child process under ``TRITON_INTERPRET=1``."""
        assert_passes_in_interpreter(__file__)

    @pytest.mark.parametrize(("capability", "dtype"), [(90, "bf16"), (90, "fp32"), (80, "bf16")])
    def test_the_kernels_compile_for_a_gpu(capability, dtype, tmp_path, monkeypatch):
        """The interpreter runs the kernels' Python, not Triton's compiler: compile
        each (to a cubin, with the wheel's ptxas; no GPU needed) at the 0.6B shape."""
        from guard import fused

        monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compiled here, not found in a cache
        constants = {
            fused._rms_norm_kernel: {"BLOCK": 1024, "ADD": True},
            fused._qk_norm_rope_store_kernel: {"HEADS": 16, "KV_HEADS": 8, "HEAD_DIM": 128, "BLOCK_HEADS": 16},
            fused._silu_mul_kernel: {"BLOCK": 1024},
        }
        for kernel, values in constants.items():
            types = {}
            for name in kernel.arg_names:
                if name.endswith("_ptr"):
                    types[name] = "*i64" if name == "slots_ptr" else f"*{dtype}"
                else:
                    types[name] = "fp32" if name.endswith("eps") else "i32"
            compile_for_gpu(kernel, values, types, capability, num_warps=4)

    def test_the_cpu_runs_transformers_modules_unless_asked(tiny_guard):
        assert ModelRunner(tiny_guard).fused is None  # "auto" on the CPU: today's torch code
        assert ModelRunner(tiny_guard, fused="off").fused is None
        with pytest.raises(ValueError, match="fused must be 'auto', 'on' or 'off'"):
            ModelRunner(tiny_guard, fused="yes")
        with pytest.raises(ValueError, match=r"interpreter \(TRITON_INTERPRET=1\).*fused='off'"):
            ModelRunner(tiny_guard, fused="on")

else:
    from guard.fused import add_rms_norm, qk_norm_rope_store, rms_norm, silu_mul, stacked_projections

    # numpy's, from inside the interpreter: noise.
    pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("rows", [1, 3, 17])
    @pytest.mark.parametrize("width", [64, 1024])
    def test_rms_norm_is_qwen3_rms_norm(dtype, rows, width):
        torch.manual_seed(rows * width)
        norm = random_norm(width, dtype)
        x = (torch.randn(rows, width) * 3).to(DEVICE, dtype)
        assert_close(rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("rows", [1, 17])
    @pytest.mark.parametrize("width", [64, 1024])
    def test_add_rms_norm_is_the_residual_add_then_the_norm(dtype, rows, width):
        torch.manual_seed(rows + width)
        norm = random_norm(width, dtype, eps=1e-5)
        x, residual = (torch.randn(2, rows, width) * 2).to(DEVICE, dtype)
        hidden, normed = add_rms_norm(x, residual, norm.weight, norm.variance_epsilon)
        assert torch.equal(hidden, residual + x)  # one rounding, the same: bit for bit
        assert_close(normed, norm(residual + x))

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("tokens", [1, 3, 17])
    @pytest.mark.parametrize("head_dim", [16, 128])
    def test_qk_norm_rope_store_is_the_norms_rotary_and_the_pool_writes(dtype, tokens, head_dim):
        torch.manual_seed(tokens * head_dim)
        heads, kv_heads, capacity = 4, 2, 40
        config = Qwen3Config(head_dim=head_dim, hidden_size=heads * head_dim, num_attention_heads=heads)
        q_norm, k_norm = random_norm(head_dim, dtype), random_norm(head_dim, dtype)
        qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim) * 2).to(DEVICE, dtype)
        positions = torch.randint(0, 5000, (1, tokens), device=DEVICE)
        cos, sin = Qwen3RotaryEmbedding(config).to(DEVICE)(qkv, positions)
        slots = torch.randperm(capacity, device=DEVICE)[:tokens]
        storage = torch.randn(2, capacity, kv_heads, head_dim).to(DEVICE, dtype)
        pool = storage.clone()
        query = qk_norm_rope_store(qkv, heads, kv_heads, q_norm, k_norm, cos[0], sin[0], pool[0], pool[1], slots)

        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=1)
        q = q_norm(q.view(1, tokens, heads, head_dim))
        k = k_norm(k.view(1, tokens, kv_heads, head_dim))
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        expected = storage.clone()
        expected[0].index_copy_(0, slots, k[0])
        expected[1].index_copy_(0, slots, v.view(tokens, kv_heads, head_dim))
        assert_close(query, q[0])
        assert_close(pool[0], expected[0])
        assert torch.equal(pool[1], expected[1])  # the values are copied, and no other slot is touched
        untouched = torch.ones(capacity, dtype=torch.bool, device=DEVICE).index_fill_(0, slots, False)
        assert torch.equal(pool[:, untouched], storage[:, untouched])

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("rows", [1, 3, 17])
    @pytest.mark.parametrize("width", [64, 1500])  # 1,500: two blocks of 1,024, the second ragged
    def test_silu_mul_is_silu_of_gate_times_up(dtype, rows, width):
        torch.manual_seed(rows + width)
        gate_up = (torch.randn(rows, 2 * width) * 4).to(DEVICE, dtype)
        gate, up = gate_up.split(width, dim=1)
        assert_close(silu_mul(gate_up), torch.nn.functional.silu(gate) * up)

    # --- the runner -------------------------------------------------------------------------------------

    @pytest.fixture(scope="module")
    def guards(tiny_checkpoint):
        """The tiny guard in each dtype, loaded when first asked for."""
        from guard import StreamGuard

        loaded = {}

        def guard(dtype: str):
            if dtype not in loaded:
                loaded[dtype] = StreamGuard.from_pretrained(tiny_checkpoint, device=DEVICE, dtype=dtype)
            return loaded[dtype]

        return guard

    @pytest.fixture(params=["float32", "bfloat16"])
    def guard(request, guards):
        return guards(request.param)

    def test_the_stacked_projections_are_the_model_s_weights(guard):
        stacked = stacked_projections(guard.model)
        assert stacked_projections(guard.model) is stacked  # once per model
        attention, mlp = guard.model.model.layers[0].self_attn, guard.model.model.layers[0].mlp
        rows = attention.q_proj.weight.shape[0]
        # Views: the model's own weights live in the stacked tensors, no second copy.
        assert attention.q_proj.weight.data_ptr() == stacked[0].qkv.data_ptr()
        assert attention.k_proj.weight.data_ptr() == stacked[0].qkv[rows:].data_ptr()
        assert mlp.up_proj.weight.data_ptr() == stacked[0].gate_up[mlp.gate_proj.weight.shape[0] :].data_ptr()

    @pytest.mark.parametrize(
        ("dtype", "attention"), [("float32", "gathered"), ("bfloat16", "gathered"), ("float32", "in place")]
    )
    def test_a_fused_session_gives_the_unfused_session_s_verdicts(guards, dtype, attention):
        """End to end on the tiny guard: the graph path's buckets and padding
        rows (eager) with every row gathered, or every segment in place."""
        guard = guards(dtype)
        sessions = []
        for fused in ("on", "off"):  # the same attention path, fused or not
            runner = ModelRunner(guard, graphs="eager" if attention == "gathered" else "off", fused=fused)
            runner.in_place_from = None if attention == "gathered" else 0
            sessions.append(GuardSession(guard, runner=runner))
        fused, plain = sessions
        for session in (fused, plain):
            session.said = [session.moderate_prompt("hi"), *session.append(ids(40, 5))]
            session.said += [verdict for token in ids(41, 4) for verdict in session.append(token)]
            session.rollback(session.response_start + 3)
            session.said += session.append(ids(42, 2)) + session.finish()
        assert_same(fused.said, plain.said)
        torch.testing.assert_close(fused.last_logits.risk_level, plain.last_logits.risk_level, rtol=0, atol=1e-4)

    def test_a_step_of_several_sessions_is_the_unfused_step(guard):
        """Packed rows of sessions at different positions, one step: rows and logits as the unfused runner's."""
        outputs = []
        for fused in ("on", "off"):
            runner = ModelRunner(guard, graphs="eager", fused=fused)
            runner.in_place_from = None
            regions = [runner.pool.new_region() for _ in range(3)]
            runner.run([Segment(region, ids(43 + n, 3 + 2 * n), True) for n, region in enumerate(regions)])
            decode = [Segment(region, ids(50 + n, 1 + n), upstream=n != 1) for n, region in enumerate(regions)]
            outputs.append(runner.run(decode))
        ours, theirs = outputs
        assert ours.offsets == theirs.offsets
        for mine, reference in zip(ours.rows, theirs.rows, strict=True):
            assert mine == pytest.approx(reference, abs=1e-4)
        torch.testing.assert_close(ours.response.risk_level, theirs.response.risk_level, rtol=0, atol=1e-4)
