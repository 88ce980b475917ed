"""Debounce-aware withholding: show only text the debounced policy has cleared.

The guard flags a response when two consecutive tokens agree that it is
unsafe (see ``guard.policy``). So when one token comes out Unsafe, the flag
is not decided yet: it depends on the next token. A streaming UI that shows
the text of that first token shows the start of what gets flagged one token
later (the demo shows " dynam", then withholds "ite"). A ``Withholder`` holds
such a piece back until the debounce decides:

    withholder = Withholder()
    for piece in adapter.push_ids(token_id):               # JudgedPieces, in order
        for released in withholder.push([piece]):          # only text the debounce has cleared
            show(released.text)
    tail = adapter.finish()                                # judges the held-back tail (and the end of the turn)
    show_all(withholder.push(tail) + withholder.finish(adapter.flagged))

The rule, for a piece judged by the guard token at position ``p``:

* its verdict does not count as unsafe (``verdict.unsafe`` is False, or it
  has no verdict): released at once, unless an earlier piece is held (order
  is kept: nothing overtakes a held piece);
* it counts as unsafe: held until a verdict of a later guard token arrives.
  If that verdict is not flagged, tokens ``p`` and ``p + 1`` did not flag
  the response, so the piece is released. If it is flagged (at
  ``flagged_at``), the pieces judged at ``flagged_at - 1`` or later are
  withheld for good, and so is everything after them; held pieces judged
  before ``flagged_at - 1`` are released (the debounce cleared them);
* at the end, ``finish(flagged)`` releases what is still held if the final
  state of the stream (after ``GuardAdapter.finish()``, which also judges the
  end of the turn) is not flagged, and withholds it otherwise.

``StreamGate`` applies this to every stream of a ``GuardStreams`` (a chat
answer's text and each tool call's arguments) and releases the chunks that
carried them, in order, each once all of its text is released: the LangChain
wrapper and the OpenAI-compatible gateway use it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any, Generic, TypeVar

from adapter import JudgedPiece
from integrations.streams import GuardStreams, StreamKey

__all__ = ["StreamGate", "Withholder"]

Item = TypeVar("Item")


def _position(piece: JudgedPiece) -> int:
    return -1 if piece.verdict is None else piece.verdict.position


class Withholder:
    """Holds back judged pieces until the debounced policy decides on them
    (see the module docstring). ``push`` takes ``JudgedPiece``s in the order
    the adapter released them and returns those that may be shown, in order;
    ``finish(flagged)`` ends the stream.

    ``held``: pieces waiting for the debounce; ``withheld``: pieces that will
    never be released (the flagged stretch and everything after it);
    ``flag``: the verdict that flagged the stream, if a piece carried it. A
    piece that is ``flagged`` without a flagged verdict (one that
    ``GuardAdapter.finish()`` released after the end of the turn flagged the
    response) is withheld, with everything still held.
    """

    def __init__(self) -> None:
        self._held: deque[JudgedPiece] = deque()
        self._latest = -1  # position of the newest verdict seen (none flagged)
        self.withheld: list[JudgedPiece] = []
        self.flag: Any = None
        self._flagged = False
        self._finished = False

    @property
    def held(self) -> list[JudgedPiece]:
        return list(self._held)

    @property
    def flagged(self) -> bool:
        """Whether the stream was flagged (by a piece, or at ``finish``):
        nothing more is released."""
        return self._flagged

    def push(self, pieces: Iterable[JudgedPiece]) -> list[JudgedPiece]:
        """The pieces, of these and of those held before, that may be shown now."""
        if self._finished:
            raise RuntimeError("this Withholder was finished; make a new one for a new stream")
        released: list[JudgedPiece] = []
        for piece in pieces:
            if self._flagged:
                self.withheld.append(piece)
                continue
            verdict = piece.verdict
            if piece.flagged:  # by its verdict, or released by a finish() that flagged the response
                flagged_at = None
                if verdict is not None and verdict.flagged:
                    self.flag, flagged_at = verdict, verdict.flagged_at
                released += self._flag_at(flagged_at)
                self.withheld.append(piece)
                continue
            if verdict is not None:
                self._latest = max(self._latest, verdict.position)
            self._held.append(piece)
            released += self._release_cleared()
        return released

    def finish(self, flagged: bool, flagged_at: int | None = None) -> list[JudgedPiece]:
        """End of the stream: ``flagged`` is its final state (read it after
        ``GuardAdapter.finish()``). Returns what is still held if the stream
        is not flagged; withholds it if it is (with ``flagged_at``, the
        position where the debounce flagged, held pieces judged before
        ``flagged_at - 1`` are released: the flag does not cover them)."""
        if self._finished:
            return []
        self._finished = True
        if self._flagged:
            return []
        if flagged:
            return self._flag_at(flagged_at)
        released = list(self._held)
        self._held.clear()
        return released

    def _release_cleared(self) -> list[JudgedPiece]:
        released = []
        while self._held:
            head = self._held[0]
            verdict = head.verdict
            # A later verdict that is not flagged clears a piece that counts as unsafe.
            if verdict is not None and verdict.unsafe and self._latest <= verdict.position:
                break
            released.append(self._held.popleft())
        return released

    def _flag_at(self, flagged_at: int | None) -> list[JudgedPiece]:
        self._flagged = True
        released = []
        if flagged_at is not None:
            while self._held and _position(self._held[0]) < flagged_at - 1:
                released.append(self._held.popleft())
        self.withheld += self._held
        self._held.clear()
        return released


class StreamGate(Generic[Item]):
    """Withholding over every stream of a ``GuardStreams``, released as the
    chunks (``Item``s) that carried the text: a chunk comes out once every
    piece of text it carried is released, and chunks come out in the order
    they went in (a chunk that carried no judged text, such as a final chunk
    with usage metadata, waits for those before it).

        gate = StreamGate(streams)
        for chunk in upstream:
            for ready in gate.push(chunk, [(StreamKey(0), text), (StreamKey(0, 0), arguments)]):
                send(ready)
            if gate.flag is not None:
                break                                   # stop the upstream; say so
        else:
            for ready in gate.finish():
                send(ready)
        # gate.flag: None, or (stream key, verdict at flagged_at)

    ``deltas`` may be a generator: it is consumed one delta at a time, each
    pushed before the next is read. ``push`` after a flag returns nothing.
    """

    _NEVER = 1 << 62  # a source index no stream reaches

    def __init__(self, streams: GuardStreams) -> None:
        self.streams = streams
        self.withholders: dict[StreamKey, Withholder] = {}
        self._released: dict[StreamKey, int] = {}  # source pieces released per stream (indices below)
        self._waiting: deque[tuple[Item, list[tuple[StreamKey, int]]]] = deque()
        self.flag: tuple[StreamKey, Any] | None = None
        self._finished = False

    def check_open(self) -> None:
        """Look for a flag already raised when the streams opened (an
        assistant prefill that is itself flagged)."""
        for key in self.streams.keys:
            verdict = self.streams.flag(key)
            if verdict is not None and self.flag is None:
                self.flag = (key, verdict)

    def push(self, item: Item, deltas: Iterable[tuple[StreamKey, str]]) -> list[Item]:
        """Judge the text ``item`` carries (``(stream key, delta)`` pairs);
        return the items now ready to send, in order."""
        if self.flag is not None:
            return []
        if self._finished:
            raise RuntimeError("this StreamGate was finished; make a new one for a new response")
        needs: list[tuple[StreamKey, int]] = []
        self._waiting.append((item, needs))
        for key, delta, *kind in deltas:  # (key, delta) or (key, delta, reasoning); a delta is text or ids
            if not delta or not self.streams.judges(key):
                continue
            reasoning = bool(kind and kind[0])
            if isinstance(delta, str):
                pieces = self.streams.push(key, delta, reasoning=reasoning)
            else:
                pieces = self.streams.push_ids(key, list(delta), reasoning=reasoning)
            needs.append((key, self.streams.pushed(key) - 1))
            self._withhold(key, pieces)
            if self.flag is not None:
                break
        return self._ready()

    def push_many(self, entries: Iterable[tuple[Item, Iterable[tuple]]]) -> list[Item]:
        """``push`` for several items in a row, with the generator ids that
        consecutive items give one stream judged in one call (one guard
        forward for a stream's tokens of the whole run, where ``push`` makes
        one per item). Each item still waits for its own text only, and the
        verdicts are those of pushing the items one by one."""
        if self.flag is not None:
            return []
        if self._finished:
            raise RuntimeError("this StreamGate was finished; make a new one for a new response")
        run: list = []  # [key, reasoning, ids, [(needs of an item, ids of the run up to its end)]]
        for item, deltas in entries:
            if self.flag is not None:
                break
            needs: list[tuple[StreamKey, int]] = []
            self._waiting.append((item, needs))
            for key, delta, *kind in deltas:
                if not delta or not self.streams.judges(key):
                    continue
                reasoning = bool(kind and kind[0])
                if not isinstance(delta, str):
                    if run and (run[0], run[1]) != (key, reasoning):
                        self._push_run(run)
                        run = []
                    if not run:
                        run = [key, reasoning, [], []]
                    run[2] += delta
                    run[3].append((needs, len(run[2])))
                    continue
                if run:
                    self._push_run(run)
                    run = []
                if self.flag is not None:
                    break
                pieces = self.streams.push(key, delta, reasoning=reasoning)
                needs.append((key, self.streams.pushed(key) - 1))
                self._withhold(key, pieces)
                if self.flag is not None:
                    break
        if run:
            self._push_run(run)
        return self._ready()

    def _push_run(self, run: list) -> None:
        key, reasoning, ids, owners = run
        if self.flag is not None:  # not judged: the items that carried these ids never go out
            for needs, _end in owners:
                needs.append((key, self._NEVER))
            return
        pieces = self.streams.push_ids(key, ids, reasoning=reasoning)
        first = self.streams.pushed(key) - len(ids)  # source pieces are ids, one each
        for needs, end in owners:
            needs.append((key, first + end - 1))
        self._withhold(key, pieces)

    def finish(self) -> list[Item]:
        """End of the response: judge what each stream still holds back;
        return the items ready to send (all of them unless flagged)."""
        if self._finished or self.flag is not None:
            self._finished = True
            return []
        self._finished = True
        for key in self.streams.keys:
            self._withhold(key, self.streams.finish(key))
            if self.flag is not None:
                return self._ready()
        flagged = set(self.streams.flagged)  # the final state: finish() also judged the end of the turn
        for key in self.streams.keys:
            withholder = self._withholder(key)
            verdict = self.streams.flag(key) or withholder.flag
            self._count(key, withholder.finish(key in flagged, getattr(verdict, "flagged_at", None)))
            if key in flagged and self.flag is None:
                self.flag = (key, verdict)
        return self._ready()

    def release_all(self) -> list[Item]:
        """Every item still waiting, judged or not, in order (the guard
        failed and the caller fails open); the gate takes nothing more."""
        self._finished = True
        items = [item for item, _ in self._waiting]
        self._waiting.clear()
        return items

    # --- internals -------------------------------------------------------

    def _withholder(self, key: StreamKey) -> Withholder:
        withholder = self.withholders.get(key)
        if withholder is None:
            withholder = self.withholders[key] = Withholder()
        return withholder

    def _withhold(self, key: StreamKey, pieces: list[JudgedPiece]) -> None:
        withholder = self._withholder(key)
        self._count(key, withholder.push(pieces))
        # The stream itself, not only its pieces: the guard tokens that flag
        # can come before the piece that holds them is judged.
        verdict = self.streams.flag(key) or withholder.flag
        if (verdict is not None or withholder.flagged) and self.flag is None:
            self._count(key, withholder.finish(True, getattr(verdict, "flagged_at", None)))
            self.flag = (key, verdict)

    def _count(self, key: StreamKey, released: list[JudgedPiece]) -> None:
        if released:
            self._released[key] = max(self._released.get(key, 0), released[-1].index + 1)

    def _ready(self) -> list[Item]:
        ready = []
        while self._waiting:
            item, needs = self._waiting[0]
            if any(index >= self._released.get(key, 0) for key, index in needs):
                break
            ready.append(item)
            self._waiting.popleft()
        return ready
