"""Errors raised by ``guard``; each says what is wrong and what to do."""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ContextLengthError",
    "DtypeError",
    "EngineCapacityError",
    "EngineClosedError",
    "EngineStepError",
    "GuardError",
    "SessionClosedError",
    "SessionStateError",
    "TokenIdError",
]


class GuardError(Exception):
    """Base class of every error raised by ``guard``."""


class CheckpointError(GuardError, ValueError):
    """The checkpoint is not a usable Qwen3Guard-Stream checkpoint."""


class DtypeError(GuardError, ValueError):
    """A ``dtype`` the guard cannot run in (it runs in float32, bfloat16 or float16)."""


class TokenIdError(GuardError, ValueError):
    """An id outside the guard's vocabulary, or a control id where text belongs."""


class ContextLengthError(GuardError, ValueError):
    """Appending would go past the model's maximum positions."""


class SessionStateError(GuardError, RuntimeError):
    """The session cannot do that now (no prompt yet, rollback past the prompt, ...)."""


class SessionClosedError(SessionStateError):
    """The session was closed; start a new one with ``StreamGuard.session()``."""


class EngineCapacityError(GuardError, RuntimeError):
    """A ``GuardEngine`` is at its ``max_sessions`` or its KV-memory budget;
    the message says which and what to do (close or roll back sessions, retry
    later, or give the engine more)."""


class EngineClosedError(GuardError, RuntimeError):
    """The ``GuardEngine`` was closed; pending and later calls fail with this.
    Start a new engine (and new sessions) to go on."""


class EngineStepError(GuardError, RuntimeError):
    """The batched forward that held this call's ids failed (the cause is
    chained); the session is exactly as it was before the call: retry the
    call or close the session."""
