"""transformers integration: a guarded streamer, a stopping criterion and CARE.

The stopping criterion alone (no streamer; batches too):

    stop = GuardStoppingCriteria(guard, tokenizer, prompt=messages)   # or prompts=[...], one per batch row
    output = model.generate(**inputs, stopping_criteria=StoppingCriteriaList([stop]))
    stop.finish()                    # judges the text still held back; stop.flagged: one bool per row

With a streamer (batch size 1):

    streamer = GuardedStreamer(GuardAdapter(guard.session(), tokenizer))
    streamer.adapter.moderate_prompt(prompt)
    Thread(target=model.generate, kwargs=dict(**inputs, streamer=streamer,
           stopping_criteria=StoppingCriteriaList([GuardStoppingCriteria(streamer)]))).start()
    for chunk in streamer:          # like TextIteratorStreamer, judged text only
        print(chunk, chunk.verdict)

transformers calls stopping criteria after it appends a step's token and
before it streams it, so the criterion judges each new token itself and
generation stops right at the token that made the debounced policy flag.
Fail closed: if the guard raises, generation stops and iterating the streamer
(or, without one, the criterion itself) raises ``GuardFailure``; pass
``fail_open=True`` to go on unjudged instead.

Beam search is refused: transformers reorders and forks the rows between
steps, and one guard stream per beam would need the guard's KV cache forked
with them. Sample or decode greedily, or judge the finished beams afterwards.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from queue import Queue
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from adapter import GuardAdapter, JudgedPiece, SourceDecoder

__all__ = [
    "GuardFailure",
    "GuardStoppingCriteria",
    "GuardedGeneration",
    "GuardedStreamer",
    "GuardedText",
    "guarded_generate",
]

logger = logging.getLogger(__name__)


class GuardFailure(RuntimeError):
    """The guard raised mid-stream; generation was stopped (fail closed)."""


class GuardedText(str):
    """A chunk of judged text (a ``str``), with the guard's verdict on it."""

    piece: JudgedPiece | None

    def __new__(cls, text: str, piece: JudgedPiece | None) -> GuardedText:
        chunk = super().__new__(cls, text)
        chunk.piece = piece
        return chunk

    @property
    def verdict(self):
        return None if self.piece is None else self.piece.verdict


_STOP = object()


class GuardedStreamer(BaseStreamer):
    """Replaces ``TextIteratorStreamer``: iterate to get ``GuardedText`` chunks,
    each judged by the guard. Once the debounced policy flags the response,
    later text is withheld and nothing more is judged (and a
    ``GuardStoppingCriteria`` on this streamer stops generation).
    ``withhold_flagged=False`` keeps judging and streams all the text, flagged
    or not, and its criterion does not stop generation unless asked
    (``stop_on_flag=True``). ``skip_prompt=False`` streams the prompt's text
    first, unjudged (verdict None), as ``TextIteratorStreamer`` does."""

    def __init__(
        self,
        adapter: GuardAdapter,
        *,
        skip_prompt: bool = True,
        timeout: float | None = None,
        fail_open: bool = False,
        withhold_flagged: bool = True,
    ) -> None:
        if not isinstance(adapter, GuardAdapter) or adapter.source_tokenizer is None:
            raise TypeError(
                "GuardedStreamer takes a GuardAdapter made with the generator's tokenizer: "
                "GuardedStreamer(GuardAdapter(guard.session(), tokenizer))"
            )
        self.adapter = adapter
        self.skip_prompt = skip_prompt
        self.timeout = timeout
        self.fail_open = fail_open
        self.withhold_flagged = withhold_flagged
        self.judged: list[JudgedPiece] = []
        self.generated: list[int] = []
        self.error: BaseException | None = None
        self._queue: Queue = Queue()
        self._queue_chunks = True  # False for rows that nobody iterates
        self._prompt_length: int | None = None  # set by the prompt's put() (or by a criterion, without one)
        self._put_count = 0
        self._fallback: SourceDecoder | None = None
        self._ended = False

    @property
    def should_stop(self) -> bool:
        """Whether generation should stop: flagged (while withholding), or the
        guard failed and this streamer does not fail open."""
        return (self.withhold_flagged and self.adapter.flagged) or self.failed_closed

    @property
    def failed_closed(self) -> bool:
        return self.error is not None and not self.fail_open

    def put(self, value: Any) -> None:
        ids = torch.as_tensor(value)
        if ids.dim() > 1 and ids.shape[0] > 1:
            raise ValueError(
                "GuardedStreamer supports batch size 1 (one conversation per guard session); for a batch, use "
                "GuardStoppingCriteria(guard, tokenizer, prompts=[...]) without a streamer"
            )
        ids_list = ids.reshape(-1).tolist()
        if self._prompt_length is None:  # transformers puts the prompt first
            self._prompt_length = len(ids_list)
            if not self.skip_prompt:
                text = "".join(piece.text for piece in SourceDecoder(self.adapter.source_tokenizer).push(ids_list))
                self._put(GuardedText(text, None))
            return
        self._put_count += len(ids_list)
        unseen = self._put_count - len(self.generated)
        if unseen > 0:  # tokens the stopping criterion has not fed already
            self._feed(ids_list[len(ids_list) - unseen :])

    def catch_up(self, input_ids: torch.Tensor) -> None:
        """Feed generated tokens of row 0 the streamer has not seen yet. The
        criterion calls this to judge a step's token before it is streamed."""
        if self._prompt_length is None:
            self._prompt_length = input_ids.shape[-1] - 1  # the criterion's first call: one new token
        generated = input_ids[0, self._prompt_length + len(self.generated) :].tolist()
        if generated:
            self._feed(generated)

    def _feed(self, ids: list[int]) -> None:
        self.generated += ids
        if self.error is not None:
            self._stream_unjudged(ids)
            return
        if self.withhold_flagged and self.adapter.flagged:
            return  # withheld: generation stops (or is let run unshown); nothing more is judged
        try:
            pieces = self.adapter.push_ids(ids)
        except Exception as error:
            self._fail(error)
            return
        self._emit(pieces)

    def end(self) -> None:
        """End of generation: judge what is still held back (idempotent)."""
        if self._ended:
            return
        self._ended = True
        if self.error is None and not (self.withhold_flagged and self.adapter.flagged):
            try:
                self._emit(self.adapter.finish())
            except Exception as error:
                self._fail(error)
        if self._fallback is not None:
            text = "".join(piece.text for piece in self._fallback.flush())
            if text:
                self._put(GuardedText(text, None))
        self._put(_STOP)

    def __iter__(self) -> GuardedStreamer:
        return self

    def __next__(self) -> GuardedText:
        value = self._queue.get(timeout=self.timeout)
        if value is _STOP:
            if self.failed_closed:
                raise GuardFailure(f"the guard failed mid-stream and generation was stopped: {self.error}") from (
                    self.error
                )
            raise StopIteration
        return value

    def _put(self, value: Any) -> None:
        if self._queue_chunks:
            self._queue.put(value, timeout=self.timeout)

    def _emit(self, pieces: list[JudgedPiece]) -> None:
        self.judged += pieces
        for piece in pieces:
            if piece.text and not (self.withhold_flagged and piece.flagged):
                self._put(GuardedText(piece.text, piece))

    def _fail(self, error: BaseException) -> None:
        self.error = error
        if not self.fail_open:
            return
        logger.warning("guard failed, streaming unjudged text as fail_open asks: %s", error)
        # Text not yet shown: decode everything generated and skip what was.
        self._fallback = SourceDecoder(self.adapter.source_tokenizer)
        shown = sum(len(piece.text) for piece in self.judged)
        text = "".join(piece.text for piece in self._fallback.push(self.generated))  # includes the failed ids
        if text[shown:]:
            self._put(GuardedText(text[shown:], None))

    def _stream_unjudged(self, ids: list[int]) -> None:
        if self._fallback is not None:
            text = "".join(piece.text for piece in self._fallback.push(ids))
            if text:
                self._put(GuardedText(text, None))


_BEAMS_REFUSED = (
    "GuardStoppingCriteria cannot follow beam search: transformers reorders and forks the rows between steps, so "
    "a guard stream per row would judge text no beam holds. Use sampling or greedy search (num_beams=1; "
    "num_return_sequences works with sampling), or generate with beams and judge each finished sequence "
    "afterwards with a GuardAdapter"
)


def _decoding_method() -> str | None:
    """The transformers decoding loop that called the criterion, if any."""
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return None
        name = frame.f_code.co_name
        in_transformers = str(frame.f_globals.get("__name__", "")).startswith("transformers")
        if in_transformers and ("beam" in name or name in ("_sample", "_assisted_decoding")):
            return name
        frame = frame.f_back
    return None


class GuardStoppingCriteria(StoppingCriteria):
    """Judges every generated token of every batch row and stops a row once
    the guard flags it (``__call__`` returns one bool per row).

    Three ways in, one meaning:

    * ``GuardStoppingCriteria(guard, tokenizer, prompt=messages)``: one guard
      stream per row, all answering ``prompt``; ``prompts=[...]`` gives each
      batch row its own (with ``num_return_sequences=k`` each prompt's k rows).
      This form owns its guard sessions: ``finish()`` closes them.
    * ``GuardStoppingCriteria(adapter)``: a GuardAdapter made with the
      generator's tokenizer (pass ``prompt=`` unless ``moderate_prompt`` was
      called), batch size 1.
    * ``GuardStoppingCriteria(streamer)``: the ``GuardedStreamer`` that is
      also passed to ``generate``, batch size 1.

    The prompt's length is learnt at the first call (transformers calls the
    criterion once each step has appended one token); assisted generation
    appends several, so pass ``prompt_length`` there. Call ``finish()`` once
    ``generate`` returns: it judges the text still held back at the end
    (the guard sees a word only once the next one starts) and returns
    ``flagged``, one bool per row; ``stopped_at[row]`` is how many tokens the
    row had generated when it was stopped (transformers may append more, or
    padding, to a stopped row while others go on).

    ``stop_on_flag``: stop a flagged row (default; for a streamer, unless it
    was made with ``withhold_flagged=False``). ``fail_open``: if the guard
    raises, go on unjudged; by default the row stops and, without a streamer
    to report it, the criterion raises ``GuardFailure``.
    """

    def __init__(
        self,
        source: Any,
        tokenizer: Any = None,
        *,
        prompt: Any = None,
        prompts: list[Any] | None = None,
        policy: Any = None,
        fail_open: bool = False,
        stop_on_flag: bool | None = None,
        prompt_length: int | None = None,
    ) -> None:
        self.fail_open = fail_open
        self.prompt_length = prompt_length
        self._given_prompt_length = prompt_length
        self._prompts: list[Any] = []
        self._owns_sessions = False
        self._attached = False  # a streamer that generate() also feeds
        if isinstance(source, GuardedStreamer):
            if tokenizer is not None or prompt is not None or prompts is not None or policy is not None:
                raise TypeError(
                    "GuardStoppingCriteria(streamer) takes the streamer's adapter as it is: give the tokenizer to "
                    "its GuardAdapter and call streamer.adapter.moderate_prompt(prompt)"
                )
            self.stop_on_flag = source.withhold_flagged if stop_on_flag is None else stop_on_flag
            self.streamers = [source]
        elif isinstance(source, GuardAdapter):
            if tokenizer is not None or prompts is not None or policy is not None:
                raise TypeError("GuardStoppingCriteria(adapter) takes the adapter's tokenizer and policy as they are")
            self.stop_on_flag = True if stop_on_flag is None else stop_on_flag
            self.streamers = [self._row(source, prompt)]
        else:
            if not callable(getattr(source, "session", None)):
                raise TypeError(
                    "GuardStoppingCriteria takes a guard (StreamGuard) plus the generator's tokenizer and the prompt: "
                    f"GuardStoppingCriteria(guard, tokenizer, prompt=messages); got {type(source).__name__}"
                )
            if tokenizer is None:
                raise TypeError("pass the generator's tokenizer: GuardStoppingCriteria(guard, tokenizer, prompt=...)")
            if (prompt is None) == (prompts is None):
                raise TypeError(
                    "pass prompt=... (the conversation every row answers) or prompts=[...] (one per batch row), "
                    "not both: the guard judges a response to a prompt"
                )
            self.stop_on_flag = True if stop_on_flag is None else stop_on_flag
            self._guard, self._tokenizer, self._policy = source, tokenizer, policy
            self._prompts = [prompt] if prompts is None else list(prompts)
            if not self._prompts:
                raise ValueError("prompts=[] holds no prompt")
            self._owns_sessions = True
            self.streamers = []
            try:
                for one in self._prompts:
                    self.streamers.append(self._new_row(one))
            except BaseException:
                self.close()
                raise
        self.stopped_at: list[int | None] = [None] * len(self.streamers)
        self._previous: torch.Tensor | None = None
        self._finished = False
        self._flagged_at_finish: list[bool] = []
        self._failure: BaseException | None = None

    # --- rows ---------------------------------------------------------------

    def _row(self, adapter: GuardAdapter, prompt: Any) -> GuardedStreamer:
        if adapter.source_tokenizer is None:
            raise TypeError("the adapter needs the generator's tokenizer: GuardAdapter(guard.session(), tokenizer)")
        if prompt is not None:
            adapter.moderate_prompt(prompt)
        elif adapter.session.response_start is None:
            raise TypeError("call adapter.moderate_prompt(prompt) first, or pass prompt=...")
        streamer = GuardedStreamer(adapter, fail_open=self.fail_open, withhold_flagged=self.stop_on_flag)
        streamer._queue_chunks = False
        return streamer

    def _new_row(self, prompt: Any) -> GuardedStreamer:
        session = self._guard.session(self._policy)
        try:
            return self._row(GuardAdapter(session, self._tokenizer), prompt)
        except BaseException:
            session.close()
            raise

    @property
    def flagged(self) -> list[bool]:
        """Per row: whether the debounced policy flagged it."""
        if self._finished:
            return list(self._flagged_at_finish)
        return [streamer.adapter.flagged for streamer in self.streamers]

    @property
    def query_verdicts(self) -> list[Any]:
        """Per row: the guard's verdict on the prompt."""
        return [streamer.adapter.session.query_verdict for streamer in self.streamers]

    @property
    def pieces(self) -> list[list[JudgedPiece]]:
        """Per row: the judged generator tokens."""
        return [streamer.judged for streamer in self.streamers]

    # --- transformers calls this ----------------------------------------------

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        if self._finished:
            raise RuntimeError(
                "this criterion is done (finish() was called, or it refused or failed); make a new "
                "GuardStoppingCriteria for a new generation"
            )
        if self._previous is None:
            self._first_call(input_ids)
        elif input_ids.shape[0] != self._previous.shape[0] or not torch.equal(
            input_ids[:, self.prompt_length : self.prompt_length + self._previous.shape[1]], self._previous
        ):
            raise ValueError(_BEAMS_REFUSED + " (the rows of input_ids changed between two steps)")
        first = self.streamers[0]
        if self._attached:
            first.catch_up(input_ids)
        else:
            start = self.prompt_length + len(first.generated)
            if input_ids.shape[1] > start:
                for streamer, ids in zip(self.streamers, input_ids[:, start:].tolist(), strict=True):
                    streamer._feed(ids)
        self._previous = input_ids[:, self.prompt_length :]
        stops = []
        for row, streamer in enumerate(self.streamers):
            stop = streamer.failed_closed or (self.stop_on_flag and streamer.adapter.flagged)
            if stop and self.stopped_at[row] is None:
                self.stopped_at[row] = len(streamer.generated)
            stops.append(stop)
        if not self._attached and any(streamer.failed_closed for streamer in self.streamers):
            self._done()  # nobody iterates a streamer to hear of it: stop generate itself
            raise GuardFailure(
                f"the guard failed mid-stream and generation was stopped: {self._failure} "
                "(fail_open=True goes on unjudged instead)"
            ) from self._failure
        return torch.tensor(stops, dtype=torch.bool, device=input_ids.device)

    def _first_call(self, input_ids: torch.Tensor) -> None:
        try:
            self._learn_rows(input_ids)
        except BaseException:
            self._done()  # refused (or the guard failed): free the sessions this criterion opened
            raise

    def _learn_rows(self, input_ids: torch.Tensor) -> None:
        method = _decoding_method()
        if method is not None and "beam" in method:
            raise ValueError(_BEAMS_REFUSED)
        rows = input_ids.shape[0]
        first = self.streamers[0]
        if not self._owns_sessions and rows != 1:
            raise ValueError(
                f"this criterion judges one conversation but generate passed {rows} rows; for a batch (or "
                "num_return_sequences > 1) use GuardStoppingCriteria(guard, tokenizer, prompts=[...]) "
                "without a streamer"
            )
        self._attached = first._prompt_length is not None  # the streamer got the prompt from generate
        if self._attached:
            self.prompt_length = first._prompt_length
        elif self._given_prompt_length is not None:
            self.prompt_length = self._given_prompt_length
        elif method == "_assisted_decoding":
            raise ValueError(
                "assisted generation appends several tokens per step, so the prompt's length cannot be learnt from "
                "the first call: pass prompt_length=input_ids.shape[1] to GuardStoppingCriteria"
            )
        else:
            self.prompt_length = input_ids.shape[1] - 1
        for streamer in self.streamers:
            if streamer._prompt_length is None:
                streamer._prompt_length = self.prompt_length
        if self._owns_sessions and rows != len(self.streamers):
            if rows % len(self._prompts):
                raise ValueError(
                    f"generate passed {rows} rows for {len(self._prompts)} prompts: give one prompt per batch row "
                    "(prompts=[...]), or prompt=... for every row"
                )
            copies = rows // len(self._prompts)  # num_return_sequences: each prompt's rows are adjacent
            streamers: list[GuardedStreamer] = []
            try:
                for streamer, one in zip(self.streamers, self._prompts, strict=True):
                    streamers.append(streamer)
                    for _ in range(copies - 1):
                        streamers.append(self._new_row(one))
                        streamers[-1]._prompt_length = self.prompt_length
            except BaseException:
                for streamer in streamers:
                    if not any(streamer is original for original in self.streamers):
                        streamer.adapter.session.close()
                raise
            self.streamers = streamers
            self.stopped_at = [None] * rows

    # --- after generate ----------------------------------------------------

    def finish(self) -> list[bool]:
        """Judge what each row still holds back; return ``flagged`` per row.
        Raises ``GuardFailure`` if the guard failed on a row (fail closed).
        Closes the guard sessions this criterion opened (idempotent)."""
        if not self._finished:
            for streamer in self.streamers:
                streamer.end()
            self._done()
        if self._failure is not None and not self._attached:
            raise GuardFailure(f"the guard failed mid-stream: {self._failure}") from self._failure
        return list(self._flagged_at_finish)

    def _done(self) -> None:
        self._flagged_at_finish = [streamer.adapter.flagged for streamer in self.streamers]
        failed = next((streamer for streamer in self.streamers if streamer.failed_closed), None)
        self._failure = None if failed is None else failed.error
        self._finished = True
        self.close()

    def close(self) -> None:
        """Free the KV caches of the sessions this criterion opened."""
        if self._owns_sessions:
            for streamer in self.streamers:
                streamer.adapter.session.close()


@dataclass
class GuardedGeneration:
    """What ``guarded_generate`` produced."""

    text: str
    ids: list[int]
    query_verdict: Any
    pieces: list[JudgedPiece] = field(default_factory=list)
    attempts: int = 1
    flagged: bool = False  # still flagged after the last retry: the text stops before the flagged part


def _flag_position(pieces: list[JudgedPiece], adapter: Any = None) -> int | None:
    """Guard position where the debounced policy flagged: from a flagged
    piece, else from the session (a piece is judged only once the guard has
    seen all of its text, so the session can be flagged before any piece)."""
    position = next((piece.verdict.flagged_at for piece in pieces if piece.flagged), None)
    if position is None and adapter is not None:
        session = adapter.session
        position = getattr(session, "flagged_at", None)
        if position is None:
            position = getattr(getattr(session, "_debouncer", None), "flagged_at", None)
    return position


def _first_unsafe_piece(pieces: list[JudgedPiece], adapter: Any = None, flagged_at: int | None = None) -> int:
    """Source index where the flagged stretch begins: the first piece judged
    by the guard token before the flag's position (debounce needs two in a
    row); without such a piece, the last piece judged. Never raises."""
    if flagged_at is None:
        flagged_at = _flag_position(pieces, adapter)
    if flagged_at is not None:
        for piece in pieces:
            if piece.verdict is not None and piece.verdict.position >= flagged_at - 1:
                return piece.index
    return pieces[-1].index if pieces else 0


def guarded_generate(
    model: Any,
    tokenizer: Any,
    guard: Any,
    prompt: str | list[dict[str, str]],
    *,
    max_new_tokens: int = 256,
    max_retries: int = 2,
    policy: Any = None,
    input_ids: list[int] | None = None,
    **generate_kwargs: Any,
) -> GuardedGeneration:
    """Generate with the guard watching; on a flag, roll back to where the
    flagged stretch began and regenerate from there (CARE), at most
    ``max_retries`` times. Use sampling (``do_sample=True``) so that a retry
    can take another path; a greedy model repeats itself.

    ``input_ids`` are the generator's prompt ids; by default the tokenizer's
    chat template renders ``prompt`` (or the bare prompt text is encoded).
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if input_ids is None:
        if getattr(tokenizer, "chat_template", None):
            input_ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        else:
            input_ids = tokenizer.encode(messages[-1]["content"])
    watch: dict[str, int | None] = {"flagged_at": None}

    def observe(tokens: list, verdicts: list) -> None:
        if watch["flagged_at"] is None:
            watch["flagged_at"] = next((v.flagged_at for v in verdicts if v.flagged), None)

    session = guard.session(policy)
    try:
        adapter = GuardAdapter(session, tokenizer, on_guard_tokens=observe)
        query_verdict = adapter.moderate_prompt(messages)
        generated: list[int] = []
        judged: list[JudgedPiece] = []
        device = next(model.parameters()).device
        attempts = 0
        while True:
            attempts += 1
            streamer = GuardedStreamer(adapter)
            budget = max_new_tokens - len(generated)
            if budget > 0:
                model.generate(
                    input_ids=torch.tensor([input_ids + generated], device=device),
                    attention_mask=torch.ones((1, len(input_ids) + len(generated)), dtype=torch.long, device=device),
                    max_new_tokens=budget,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([GuardStoppingCriteria(streamer)]),
                    **generate_kwargs,
                )
            else:
                streamer.end()
            list(streamer)  # drain; raises GuardFailure if the guard failed (fail closed)
            generated += streamer.generated
            judged += streamer.judged
            if not adapter.flagged:
                break
            start = _first_unsafe_piece(judged, adapter, watch["flagged_at"])
            kept = adapter.rollback(start)
            if not adapter.flagged:
                watch["flagged_at"] = None
            generated = generated[:start]
            judged = [piece for piece in judged if piece.index < kept]  # the rest are judged again
            if attempts > max_retries:
                judged += adapter.finish()
                return GuardedGeneration(
                    "".join(p.text for p in judged), generated, query_verdict, judged, attempts, flagged=True
                )
        return GuardedGeneration("".join(p.text for p in judged), generated, query_verdict, judged, attempts)
    finally:
        session.close()
