"""transformers integration: a guarded streamer, a stopping criterion and CARE.

One way in for all three: the generator's tokenizer and the guard.

With a streamer (batch size 1), where ``TextIteratorStreamer`` was:

    streamer = GuardedStreamer(tokenizer, guard, skip_prompt=True, skip_special_tokens=True)
    streamer.moderate_prompt(messages)                  # the query verdict; judge the prompt first
    Thread(target=model.generate, kwargs=dict(**inputs, streamer=streamer,
           stopping_criteria=StoppingCriteriaList([GuardStoppingCriteria(streamer)]))).start()
    for chunk in streamer:          # judged text only; chunk.verdict
        print(chunk, end="")

The stopping criterion alone (no streamer; batches too):

    stop = GuardStoppingCriteria(tokenizer, guard, prompt=messages)   # or prompts=[...], one per batch row
    output = model.generate(**inputs, stopping_criteria=StoppingCriteriaList([stop]))
    stop.finish()                    # judges the text still held back; stop.flagged: one bool per row

CARE (detect, roll back, regenerate): ``guarded_generate(model, tokenizer, guard, messages)``.

transformers calls stopping criteria after it appends a step's token and
before it streams it, so the criterion judges each new token itself and
generation stops right at the token that made the debounced policy flag.
The streamer shows a piece only once the debounce has cleared it
(``integrations.withhold``): a token that counts as unsafe waits for the
next verdict, so the start of a flagged stretch is never shown.
Fail closed: if the guard raises, generation stops and iterating the streamer
(or, without one, the criterion itself) raises ``GuardFailure``; pass
``fail_open=True`` to go on unjudged instead. Any other error on the
generation side (a wrong argument to ``generate``, a batch of two, an
exception inside ``generate``) reaches the loop over the streamer too.

Beam search is refused: transformers reorders and forks the rows between
steps, and one guard stream per beam would need the guard's KV cache forked
with them. Sample or decode greedily, or judge the finished beams afterwards.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from queue import Empty, Queue
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from adapter import Flag, GuardAdapter, JudgedPiece, SourceDecoder, SourcePiece
from integrations.withhold import Withholder

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


def _is_guard(value: Any) -> bool:
    """A StreamGuard or a GuardEngine (anything that opens guard sessions)."""
    return callable(getattr(value, "session", None))


def _tokenizer_and_guard(first: Any, second: Any, usage: str) -> tuple[Any, Any]:
    """(tokenizer, guard) from two arguments given in either order."""
    if _is_guard(second) and not _is_guard(first):
        return first, second
    if _is_guard(first) and not _is_guard(second):
        return second, first
    raise TypeError(f"{usage} takes the generator's tokenizer and the guard (a StreamGuard)")


# --- errors on the generation side reach the consumer -------------------------------------
#
# TextIteratorStreamer's consumer waits forever when generate() dies in its
# thread before calling end(). A GuardedStreamer hears of it three ways: an
# error inside put()/end() is recorded there; an exception that ends a
# threading.Thread whose frames reference the streamer (generate's own
# ``streamer`` argument, or a local of the thread's target) is passed on by a
# chained threading.excepthook; and a producer thread that is gone without
# ending the stream is noticed while waiting.

_watched: weakref.WeakSet[GuardedStreamer] = weakref.WeakSet()
_watch_lock = threading.Lock()


def _pass_on_thread_errors(args: threading.ExceptHookArgs) -> None:
    error, traceback = args.exc_value, args.exc_traceback
    if error is None or traceback is None or isinstance(error, SystemExit):
        return
    streamers = {id(streamer): streamer for streamer in list(_watched)}
    if not streamers:
        return
    found: dict[int, GuardedStreamer] = {}
    while traceback is not None:
        for value in traceback.tb_frame.f_locals.values():
            if id(value) in streamers:
                found[id(value)] = streamers[id(value)]
        traceback = traceback.tb_next
    for streamer in found.values():
        streamer._generation_failed(error)


def _install_thread_hook() -> None:
    with _watch_lock:
        if getattr(threading.excepthook, "_crossguard", False):
            return
        previous = threading.excepthook

        def hook(args: threading.ExceptHookArgs) -> None:
            try:
                _pass_on_thread_errors(args)
            except Exception:  # pragma: no cover - never let the hook hide the original error
                logger.exception("GuardedStreamer could not pass on an error of the generation thread")
            previous(args)

        hook._crossguard = True  # type: ignore[attr-defined]
        threading.excepthook = hook


_DECODE_KWARGS = ("skip_special_tokens", "clean_up_tokenization_spaces")
_POLL_S = 0.2  # how often a waiting consumer checks that the generation thread is still there


class GuardedStreamer(BaseStreamer):
    """A drop-in for ``TextIteratorStreamer`` that shows only judged text.

        streamer = GuardedStreamer(tokenizer, guard, skip_prompt=True, timeout=None, **decode_kwargs)
        streamer.moderate_prompt(messages)       # before generate: the guard judges the answer to this prompt
        Thread(target=model.generate, kwargs=dict(**inputs, streamer=streamer)).start()
        for chunk in streamer:                   # GuardedText: a str, with .verdict
            ...

    Pass ``GuardStoppingCriteria(streamer)`` to ``generate`` too, to stop
    generation at the flag (without it, generation runs on and the rest is
    withheld). ``GuardedStreamer(adapter)`` takes a ``GuardAdapter`` made
    with the generator's tokenizer instead of the tokenizer and the guard.

    What is shown: a piece of text once the debounced policy has cleared it
    (a token that counts as unsafe waits for the next verdict; see
    ``integrations.withhold``). Once the response is flagged, nothing more is
    shown or judged. ``withhold_flagged=False`` shows everything, flagged or
    not, each chunk with its verdict (and its criterion then does not stop
    generation unless asked: ``stop_on_flag=True``).

    ``TextIteratorStreamer``'s arguments:

    * ``skip_prompt`` (default True, unlike ``TextIteratorStreamer``):
      False streams the prompt's text first, unjudged (verdict None). The
      prompt is never judged as response text: the guard judges the
      response against what ``moderate_prompt`` was given.
    * ``timeout``: ``next()`` raises ``queue.Empty`` after that many seconds
      without text.
    * ``skip_special_tokens`` (default True, unlike ``TextIteratorStreamer``):
      False shows the special tokens' text too (``<|eot_id|>``). The guard
      always judges the text without them: they are markup, not content.
    * ``clean_up_tokenization_spaces``: only False (or None). Clean-up
      rewrites text after it was judged (``"do n't ."`` becomes
      ``"don't."``); the stream is the tokenizer's exact decode, which is
      what the guard judged. Other decode arguments are refused.

    ``fail_open``: if the guard raises, stream the rest unjudged (verdict
    None) instead of stopping (default: iterating raises ``GuardFailure``).
    ``policy``: the guard's policy (strict/loose, debounce), with a guard.

    Errors on the generation side are raised by the loop over the streamer
    (the exception ``generate`` raised, in the thread running it), never a
    hang. A streamer serves one ``generate`` call: make a new one for the next.
    """

    def __init__(
        self,
        tokenizer: Any,
        guard: Any = None,
        *,
        skip_prompt: bool = True,
        timeout: float | None = None,
        policy: Any = None,
        fail_open: bool = False,
        withhold_flagged: bool = True,
        **decode_kwargs: Any,
    ) -> None:
        unknown = sorted(set(decode_kwargs) - set(_DECODE_KWARGS))
        if unknown:
            raise TypeError(
                f"GuardedStreamer does not take {', '.join(unknown)}: of the decode arguments it takes "
                f"{' and '.join(_DECODE_KWARGS)} (plus skip_prompt, timeout, policy, fail_open, withhold_flagged)"
            )
        if decode_kwargs.get("clean_up_tokenization_spaces"):
            raise ValueError(
                "clean_up_tokenization_spaces=True is not supported: clean-up rewrites text after the guard judged "
                "it ('do n't .' becomes \"don't.\"), and the stream is exactly the text that was judged: the "
                "tokenizer's decode without clean-up. Leave it out (or pass False)"
            )
        skip_special_tokens = decode_kwargs.get("skip_special_tokens", True)
        if not isinstance(skip_special_tokens, bool):
            raise TypeError(f"skip_special_tokens must be True or False, got {skip_special_tokens!r}")
        self._owns_session = False
        if isinstance(tokenizer, GuardAdapter):
            if guard is not None or policy is not None:
                raise TypeError(
                    "GuardedStreamer(adapter) takes the adapter's guard session and tokenizer as they are; "
                    "pass either an adapter or GuardedStreamer(tokenizer, guard)"
                )
            adapter = tokenizer
            if adapter.source_tokenizer is None:
                raise TypeError(
                    "the adapter needs the generator's tokenizer: GuardAdapter(guard.session(), tokenizer), or "
                    "GuardedStreamer(tokenizer, guard)"
                )
        else:
            if guard is None:
                raise TypeError(
                    "GuardedStreamer takes the generator's tokenizer and the guard: "
                    "GuardedStreamer(tokenizer, guard, skip_prompt=True), then streamer.moderate_prompt(messages) "
                    "before generate() (or GuardedStreamer(GuardAdapter(guard.session(), tokenizer)))"
                )
            tokenizer, guard = _tokenizer_and_guard(tokenizer, guard, "GuardedStreamer(tokenizer, guard)")
            session = guard.session(policy)
            try:
                adapter = GuardAdapter(session, tokenizer)  # refuses a tokenizer it cannot decode
            except BaseException:
                session.close()
                raise
            self._owns_session = True
        self.adapter = adapter
        self.skip_prompt = skip_prompt
        self.timeout = timeout
        self.fail_open = fail_open
        self.withhold_flagged = withhold_flagged
        self.skip_special_tokens = skip_special_tokens
        self.judged: list[JudgedPiece] = []
        self.generated: list[int] = []
        self.error: BaseException | None = None  # the guard's failure
        self._withholder = Withholder()
        # With skip_special_tokens=False the text shown comes from a decoder
        # that keeps special tokens, released piece by piece as the judged
        # text of the same generator token is.
        self._display = (
            None if skip_special_tokens else SourceDecoder(adapter.source_tokenizer, skip_special_tokens=False)
        )
        self._display_waiting: deque[SourcePiece] = deque()
        self._released_pieces: dict[int, JudgedPiece] = {}
        self._released_upto = 0  # generator tokens whose text may be shown: indices below this
        self._shown = 0  # characters shown (of the text shown)
        self._queue: Queue = Queue()
        self._queue_chunks = True  # False for rows that nobody iterates
        self._prompt_length: int | None = None  # set by the prompt's put() (or by a criterion, without one)
        self._put_count = 0
        self._fallback: SourceDecoder | None = None
        self._ended = False
        self._exhausted = False
        self._producer: threading.Thread | None = None
        self._generation_error: BaseException | None = None
        self._usage_error: BaseException | None = None
        _install_thread_hook()
        _watched.add(self)

    # --- the conversation ----------------------------------------------------

    def moderate_prompt(self, prompt: Any) -> Any:
        """Judge the prompt (a string or chat messages); returns the query
        verdict. Call it before ``generate``."""
        return self.adapter.moderate_prompt(prompt)

    @property
    def query_verdict(self) -> Any:
        return self.adapter.session.query_verdict

    @property
    def flagged(self) -> bool:
        return self.adapter.flagged

    @property
    def flag(self) -> Flag | None:
        """Where and why the response was flagged (an ``adapter.Flag``;
        None while it is not), the end of turn included once it ended."""
        return self.adapter.flag

    @property
    def should_stop(self) -> bool:
        """Whether generation should stop: flagged (while withholding), or the
        guard failed and this streamer does not fail open."""
        return (self.withhold_flagged and self.adapter.flagged) or self.failed_closed

    @property
    def failed_closed(self) -> bool:
        return self.error is not None and not self.fail_open

    @property
    def withheld(self) -> list[JudgedPiece]:
        """Judged pieces never shown: the flagged stretch and what followed."""
        return list(self._withholder.withheld)

    # --- transformers calls these ------------------------------------------------

    def put(self, value: Any) -> None:
        if self._producer is None:
            self._producer = threading.current_thread()
        try:
            self._put_ids(value)
        except BaseException as error:
            self._generation_failed(error)
            raise

    def _put_ids(self, value: Any) -> None:
        if self._ended:
            self._usage_error = RuntimeError(
                "this GuardedStreamer has already streamed a generation (its stream ended); make a new "
                "GuardedStreamer for each generate() call, as with TextIteratorStreamer"
            )
            raise self._usage_error
        ids = torch.as_tensor(value)
        if ids.dim() > 1 and ids.shape[0] > 1:
            raise ValueError(
                f"GuardedStreamer supports batch size 1 (one conversation per guard session), got {ids.shape[0]} "
                "rows; for a batch, use GuardStoppingCriteria(tokenizer, guard, prompts=[...]) without a streamer"
            )
        ids_list = ids.reshape(-1).tolist()
        if self._prompt_length is None:  # transformers puts the prompt first
            if self.adapter.session.response_start is None:
                raise RuntimeError(
                    "call streamer.moderate_prompt(messages) before generate(): the guard judges the answer "
                    "against its prompt"
                )
            self._prompt_length = len(ids_list)
            if not self.skip_prompt:
                decoder = SourceDecoder(self.adapter.source_tokenizer, skip_special_tokens=self.skip_special_tokens)
                text = "".join(piece.text for piece in [*decoder.push(ids_list), *decoder.flush()])
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
        if self._ended:
            raise RuntimeError("this GuardedStreamer's stream has ended; make a new one for a new generation")
        self.generated += ids
        if self.error is not None:
            self._stream_unjudged(ids)
            return
        if self.withhold_flagged and self.adapter.flagged:
            return  # withheld: generation stops (or is let run unshown); nothing more is judged
        try:
            pieces = self.adapter.push_ids(ids)
            if self._display is not None:
                self._display_waiting.extend(self._display.push(ids))
        except Exception as error:
            self._fail(error)
            return
        self._emit(pieces)

    def end(self) -> None:
        """End of generation: judge what is still held back (idempotent)."""
        if self._ended:
            return
        self._ended = True
        try:
            self._finish()
        finally:
            if self._owns_session:
                self.adapter.session.close()
            self._put(_STOP)

    def _finish(self) -> None:
        judging = self.error is None and not (self.withhold_flagged and self.adapter.flagged)
        if judging and self.adapter.session.response_start is not None:  # the prompt was judged
            try:
                pieces = self.adapter.finish()
                if self._display is not None:
                    self._display_waiting.extend(self._display.flush())
            except Exception as error:
                self._fail(error)
            else:
                self._emit(pieces)
        if self.error is None and self.withhold_flagged:
            # The final state: finish() judges the end of the text (and the turn).
            self._show(self._withholder.finish(self.adapter.flagged))
        if self._fallback is not None:
            text = "".join(piece.text for piece in self._fallback.flush())
            self._put_text(text, None)

    # --- the consumer's side --------------------------------------------------------

    def __iter__(self) -> GuardedStreamer:
        return self

    def __next__(self) -> GuardedText:
        if self._exhausted:
            if self._usage_error is not None:
                raise self._usage_error
            raise StopIteration
        value = self._get()
        if value is _STOP:
            self._exhausted = True
            if self._usage_error is not None:
                raise self._usage_error
            if self._generation_error is not None:
                raise self._generation_error
            if self.failed_closed:
                raise GuardFailure(f"the guard failed mid-stream and generation was stopped: {self.error}") from (
                    self.error
                )
            raise StopIteration
        return value

    def _get(self) -> Any:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            wait = _POLL_S if deadline is None else max(0.0, min(_POLL_S, deadline - time.monotonic()))
            try:
                return self._queue.get(timeout=wait)
            except Empty:
                if self._producer_gone():
                    try:
                        return self._queue.get_nowait()
                    except Empty:
                        raise RuntimeError(
                            "generate() stopped without ending the stream (it raised in its thread, or the "
                            "streamer was driven by hand): no more text will come"
                        ) from None
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    def _producer_gone(self) -> bool:
        producer = self._producer
        return producer is not None and (producer is threading.current_thread() or not producer.is_alive())

    def _generation_failed(self, error: BaseException) -> None:
        """generate() raised (in put/end, or in its thread): end the stream
        so that the consumer raises ``error`` instead of waiting."""
        if self._ended or self._exhausted:
            return
        if self._generation_error is None and error is not self._usage_error:
            self._generation_error = error
        self._ended = True
        if self._owns_session:
            self.adapter.session.close()
        self._put(_STOP)

    # --- showing text --------------------------------------------------------------

    def _put(self, value: Any) -> None:
        if self._queue_chunks:
            self._queue.put(value)

    def _put_text(self, text: str, piece: JudgedPiece | None) -> None:
        if text:
            self._shown += len(text)
            self._put(GuardedText(text, piece))

    def _emit(self, pieces: list[JudgedPiece]) -> None:
        self.judged += pieces
        self._show(self._withholder.push(pieces) if self.withhold_flagged else pieces)

    def _show(self, released: list[JudgedPiece]) -> None:
        if self._display is None:
            for piece in released:
                self._put_text(piece.text, piece)
            return
        for piece in released:
            self._released_pieces[piece.index] = piece
            self._released_upto = max(self._released_upto, piece.index + 1)
        while self._display_waiting and self._display_waiting[0].index < self._released_upto:
            shown = self._display_waiting.popleft()
            self._put_text(shown.text, self._released_pieces.pop(shown.index, None))

    def _fail(self, error: BaseException) -> None:
        self.error = error
        if not self.fail_open:
            return
        logger.warning("guard failed, streaming unjudged text as fail_open asks: %s", error)
        # Text not yet shown (held pieces too): decode everything generated and skip what was shown.
        self._fallback = SourceDecoder(self.adapter.source_tokenizer, skip_special_tokens=self.skip_special_tokens)
        text = "".join(piece.text for piece in self._fallback.push(self.generated))  # includes the failed ids
        self._put_text(text[self._shown :], None)

    def _stream_unjudged(self, ids: list[int]) -> None:
        if self._fallback is not None:
            self._put_text("".join(piece.text for piece in self._fallback.push(ids)), None)


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

    * ``GuardStoppingCriteria(tokenizer, guard, prompt=messages)``: one guard
      stream per row, all answering ``prompt``; ``prompts=[...]`` gives each
      batch row its own (with ``num_return_sequences=k`` each prompt's k rows).
      This form owns its guard sessions: ``finish()`` closes them. The
      tokenizer and the guard may come in either order.
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
                    "GuardStoppingCriteria(streamer) uses the streamer's tokenizer, guard and policy as they are: "
                    "call streamer.moderate_prompt(prompt) before generate()"
                )
            self.stop_on_flag = source.withhold_flagged if stop_on_flag is None else stop_on_flag
            self.streamers = [source]
        elif isinstance(source, GuardAdapter):
            if tokenizer is not None or prompts is not None or policy is not None:
                raise TypeError("GuardStoppingCriteria(adapter) takes the adapter's tokenizer and policy as they are")
            self.stop_on_flag = True if stop_on_flag is None else stop_on_flag
            self.streamers = [self._row(source, prompt)]
        else:
            if tokenizer is None and _is_guard(source):
                raise TypeError("pass the generator's tokenizer: GuardStoppingCriteria(tokenizer, guard, prompt=...)")
            if not (_is_guard(source) or _is_guard(tokenizer)):
                raise TypeError(
                    "GuardStoppingCriteria takes the generator's tokenizer, the guard (StreamGuard) and the prompt: "
                    f"GuardStoppingCriteria(tokenizer, guard, prompt=messages); got {type(source).__name__}"
                    + ("" if tokenizer is None else f" and {type(tokenizer).__name__}")
                    + " (or a GuardedStreamer, or a GuardAdapter)"
                )
            tokenizer, source = _tokenizer_and_guard(source, tokenizer, "GuardStoppingCriteria")
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
        streamer._queue_chunks = False  # nobody iterates it
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
    def flags(self) -> list[Flag | None]:
        """Per row: where and why it was flagged (an ``adapter.Flag``, None
        if it was not), the end of turn included after ``finish()``."""
        return [streamer.adapter.flag for streamer in self.streamers]

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
    """What ``guarded_generate`` produced. Its repr leaves out the ids and the
    judged pieces (one verdict per generator token: tens of kB to print).

    ``text`` (the generator's ``ids``, decoded) is judged clean through its
    end of turn: the guard, judging it afresh as the whole answer, does not
    flag it. ``flagged``: the retries ran out and ``text`` stops where the
    last flagged stretch began (before any character of it). ``flags``: every
    flag raised on the way, in order (``Flag``: where, as the generator token
    index in the attempt that raised it, and why, its verdict); each one was
    rolled back.
    """

    text: str
    ids: list[int] = field(repr=False)
    query_verdict: Any
    pieces: list[JudgedPiece] = field(default_factory=list, repr=False)
    attempts: int = 1
    flagged: bool = False
    flags: list[Flag] = field(default_factory=list)


def _text(pieces: list[JudgedPiece]) -> str:
    return "".join(piece.text for piece in pieces)


def _prompt_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """The generator's prompt: its chat template, rendered and tokenized
    (transformers 5 returns a BatchEncoding from ``apply_chat_template``),
    or the last message's text encoded as the tokenizer does."""
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        ids = encoded["input_ids"]
    else:
        ids = tokenizer.encode(messages[-1]["content"])
        ids = getattr(ids, "ids", ids)  # a tokenizers.Tokenizer gives an Encoding
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # a batch of one
        (ids,) = ids
    return [int(token_id) for token_id in ids]


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
    chat template renders ``prompt`` with the generation prompt (or, for a
    tokenizer without one, the last message's text is encoded).
    """
    tokenizer, guard = _tokenizer_and_guard(tokenizer, guard, "guarded_generate(model, tokenizer, guard, prompt)")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if input_ids is None:
        input_ids = _prompt_ids(tokenizer, messages)
    else:
        input_ids = [int(token_id) for token_id in input_ids]
    session = guard.session(policy)
    try:
        adapter = GuardAdapter(session, tokenizer)
        query_verdict = adapter.moderate_prompt(messages)
        generated: list[int] = []
        judged: list[JudgedPiece] = []
        flags: list[Flag] = []
        device = next(model.parameters()).device

        def roll_back_the_flag() -> None:
            nonlocal generated, judged
            flag = adapter.flag
            flags.append(flag)
            kept = adapter.rollback(flag.rollback_to)  # the stretch's first whole character, and all after it
            generated = generated[: flag.rollback_to]
            judged = [piece for piece in judged if piece.index < kept]  # the rest are judged again

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
            if not adapter.flagged:  # the streamer's end() judged the end of turn too
                return GuardedGeneration(_text(judged), generated, query_verdict, judged, attempts, flags=flags)
            roll_back_the_flag()
            if attempts > max_retries:
                break
        # Out of retries: what is kept must itself be clean through its end of
        # turn. The end of turn can flag the kept text's last words again:
        # take them back too, until it is clean (or nothing is left).
        judged += adapter.finish()
        while adapter.flagged and generated:
            roll_back_the_flag()
            judged += adapter.finish()
        return GuardedGeneration(_text(judged), generated, query_verdict, judged, attempts, flagged=True, flags=flags)
    finally:
        session.close()
