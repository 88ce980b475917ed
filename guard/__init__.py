"""Qwen3Guard-Stream on transformers 5 with a KV-cached, rollback-capable session."""

from guard.config import GuardLabels
from guard.engine import EngineSession, GuardEngine
from guard.errors import (
    CheckpointError,
    ContextLengthError,
    DtypeError,
    EngineCapacityError,
    EngineClosedError,
    EngineStepError,
    GuardError,
    SessionClosedError,
    SessionStateError,
    TokenIdError,
)
from guard.policy import Policy, Verdict
from guard.session import GuardSession
from guard.stream_guard import DEFAULT_GUARD, StreamGuard

__all__ = [
    "DEFAULT_GUARD",
    "CheckpointError",
    "ContextLengthError",
    "DtypeError",
    "EngineCapacityError",
    "EngineClosedError",
    "EngineSession",
    "EngineStepError",
    "GuardEngine",
    "GuardError",
    "GuardLabels",
    "GuardSession",
    "Policy",
    "SessionClosedError",
    "SessionStateError",
    "StreamGuard",
    "TokenIdError",
    "Verdict",
]
