"""What the Triton kernels' tests share: a run of a test file in Triton's
interpreter, and a compile to a GPU's machine code without a GPU.

Triton picks its interpreter when it is imported (``TRITON_INTERPRET=1``), so
a machine without CUDA runs a kernel test file again in a child process with
the variable set; nothing else in the run sees it. The interpreter runs the
kernels' Python, not Triton's compiler: ``compile_for_gpu`` compiles a kernel
to a cubin with the wheel's own ptxas, which catches what only the compiler
sees (types, layouts, shared memory) with no GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def assert_passes_in_interpreter(test_file: str) -> None:
    """Every test of ``test_file``, in a child process under ``TRITON_INTERPRET=1``; none may skip."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", test_file],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and " skipped" not in done.stdout, done.stdout[-2000:]


def compile_for_gpu(kernel, constants: dict, types: dict[str, str], capability: int, **options):
    """``kernel`` compiled for CUDA compute capability ``capability`` (80, 90, ...):
    ``constants`` gives its constexpr arguments, ``types`` every other argument's
    Triton type ("*bf16", "i32", "fp32", ...). Call with ``TRITON_CACHE_DIR`` set
    to a fresh folder, so that it is compiled, not found in a cache."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: "constexpr" if name in constants else types[name] for name in kernel.arg_names}
    where = {(kernel.arg_names.index(name),): value for name, value in constants.items()}
    source = ASTSource(fn=kernel, signature=signature, constexprs=where)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    assert compiled.asm["cubin"], kernel.__name__
    return compiled
