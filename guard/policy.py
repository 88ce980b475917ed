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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Debouncer", "Policy", "Verdict"]

Mode = Literal["strict", "loose"]
DebounceRule = Literal["official", "report"]
SAFE, UNSAFE, CONTROVERSIAL = "Safe", "Unsafe", "Controversial"


@dataclass(frozen=True, slots=True)
class Policy:
    mode: Mode = "strict"
    debounce: DebounceRule = "official"

    def __post_init__(self) -> None:
        if self.mode not in ("strict", "loose"):
            raise ValueError(f"mode must be 'strict' or 'loose', got {self.mode!r}")
        if self.debounce not in ("official", "report"):
            raise ValueError(f"debounce must be 'official' or 'report', got {self.debounce!r}")

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
    before this token, from position ``flagged_at``.
    """

    position: int
    risk_level: str
    risk_prob: float
    category: str | None
    category_prob: float | None
    unsafe: bool
    flagged: bool = False
    flagged_at: int | None = None


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
