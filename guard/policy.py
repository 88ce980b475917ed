"""Verdicts and the streaming policy: strict/loose and debounce.

Qwen3Guard-Stream labels every token Safe, Unsafe or Controversial. A single
noisy token should not stop a generator, so a response is *flagged* only when
two consecutive response tokens agree:

* ``"report"``, the technical report's rule: tokens i-1 and i both count as
  unsafe under the mode (strict: Unsafe or Controversial; loose: Unsafe);
* ``"official"`` (default), the official evaluation code's rule: two
  consecutive Unsafe flag the response Unsafe; otherwise two consecutive
  Controversial flag it Controversial, which counts in strict mode only.

Flagging is sticky: once flagged, every later verdict of the response says so.

Two more choices, both made to judge what upstream judges:

* ``context_limit``: what to do at the checkpoint's ``max_position_embeddings``
  (8192 in the released checkpoints' config, presumably the guard's training
  length). ``"continue"`` (default) keeps judging past it, as upstream's own code
  does (it never checks the length): every verdict there says
  ``past_trained_length=True`` and the session logs one warning.
  ``"error"`` fails closed instead: the append that would pass the limit
  raises ``ContextLengthError`` and changes nothing.
* ``arithmetic``: how logits become a label. ``"upstream"`` takes softmax on
  bfloat16 logits, rounds the probabilities to bfloat16 and takes the first
  maximum, exactly as upstream's evaluation does with the bf16 model (so two
  classes whose probabilities round to the same bf16 value go to the lower
  index: Safe before Unsafe before Controversial). ``"float32"`` takes
  softmax and argmax in float32. ``"auto"`` (default) is ``"upstream"`` when
  the model runs in bfloat16 (the released checkpoints' dtype) and
  ``"float32"`` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Debouncer", "Policy", "Verdict"]

Mode = Literal["strict", "loose"]
DebounceRule = Literal["official", "report"]
ContextLimit = Literal["continue", "error"]
Arithmetic = Literal["auto", "upstream", "float32"]
SAFE, UNSAFE, CONTROVERSIAL = "Safe", "Unsafe", "Controversial"
_CHOICES = {
    "mode": ("strict", "loose"),
    "debounce": ("official", "report"),
    "context_limit": ("continue", "error"),
    "arithmetic": ("auto", "upstream", "float32"),
}


@dataclass(frozen=True, slots=True)
class Policy:
    """How verdicts are made and when the response is flagged (see the module docstring)."""

    mode: Mode = "strict"
    debounce: DebounceRule = "official"
    context_limit: ContextLimit = "continue"
    arithmetic: Arithmetic = "auto"

    def __post_init__(self) -> None:
        for field, choices in _CHOICES.items():
            value = getattr(self, field)
            if value not in choices:
                allowed = " or ".join(repr(choice) for choice in choices)
                raise ValueError(f"{field} must be {allowed}, got {value!r}")

    def upstream_arithmetic(self, logits_dtype: object) -> bool:
        """Whether verdicts of logits of this dtype use upstream's bf16 arithmetic."""
        if self.arithmetic == "auto":
            import torch

            return logits_dtype == torch.bfloat16
        return self.arithmetic == "upstream"

    def counts_as_unsafe(self, risk_level: str) -> bool:
        return risk_level == UNSAFE or (self.mode == "strict" and risk_level == CONTROVERSIAL)

    def flags(self, previous: str, current: str) -> bool:
        """Whether two consecutive response tokens flag the response."""
        if self.debounce == "report":
            return self.counts_as_unsafe(previous) and self.counts_as_unsafe(current)
        if previous == current == UNSAFE:
            return True
        return self.mode == "strict" and previous == current == CONTROVERSIAL


@dataclass(frozen=True, slots=True)
class Verdict:
    """The guard's judgement of one token.

    ``risk_level``/``risk_prob`` and ``category``/``category_prob`` use the
    names of upstream's result dict; ``category`` is ``None`` when the risk
    level is Safe (the category head is meaningless then). ``unsafe`` says
    whether this token alone counts as unsafe under the policy's mode;
    ``flagged`` whether the debounced policy has flagged the response at or
    before this token, from position ``flagged_at``. ``past_trained_length``:
    the token stands at or past the checkpoint's ``max_position_embeddings``
    (only with ``Policy(context_limit="continue")``), where the guard was
    never trained; the verdict is still the model's.
    """

    position: int
    risk_level: str
    risk_prob: float
    category: str | None
    category_prob: float | None
    unsafe: bool
    flagged: bool = False
    flagged_at: int | None = None
    past_trained_length: bool = False


class Debouncer:
    """The debounce state of one response, rollback-able by position."""

    __slots__ = ("_flagged_at", "_levels", "_start", "policy")

    def __init__(self, policy: Policy, start: int) -> None:
        self.policy = policy
        self._start = start  # position of the first response token
        self._levels: list[str] = []  # risk level of each response token
        self._flagged_at: int | None = None

    @property
    def flagged_at(self) -> int | None:
        return self._flagged_at

    @property
    def start(self) -> int:
        """Position of the first token the debounce judges."""
        return self._start

    def observe(self, position: int, risk_level: str) -> tuple[bool, int | None]:
        if position != self._start + len(self._levels):
            raise AssertionError("positions must arrive in order")
        if self._flagged_at is None and self._levels and self.policy.flags(self._levels[-1], risk_level):
            self._flagged_at = position
        self._levels.append(risk_level)
        return self._flagged_at is not None, self._flagged_at

    def rollback(self, position: int) -> None:
        del self._levels[max(position - self._start, 0) :]
        if self._flagged_at is not None and self._flagged_at >= position:
            self._flagged_at = None
