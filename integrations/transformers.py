"""transformers integration: a guarded streamer, a stopping criterion and CARE.

    streamer = GuardedStreamer(GuardAdapter(guard.session(), tokenizer))
    streamer.adapter.moderate_prompt(prompt)
    Thread(target=model.generate, kwargs=dict(**inputs, streamer=streamer,
           stopping_criteria=StoppingCriteriaList([GuardStoppingCriteria(streamer)]))).start()
    for chunk in streamer:          # like TextIteratorStreamer, judged text only
        print(chunk, chunk.verdict)

The guard runs inside ``put``, on the generation thread, so the stopping
criterion sees every verdict the moment it exists. Fail closed: if the guard
raises, generation stops and iterating raises ``GuardFailure``; pass
``fail_open=True`` to stream unjudged text instead.
"""

from __future__ import annotations

import logging
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
    later text is withheld (``withhold_flagged=False`` streams it anyway)."""

    def __init__(
        self,
        adapter: GuardAdapter,
        *,
        skip_prompt: bool = True,
        timeout: float | None = None,
        fail_open: bool = False,
        withhold_flagged: bool = True,
    ) -> None:
        self.adapter = adapter
        self.skip_prompt = skip_prompt
        self.timeout = timeout
        self.fail_open = fail_open
        self.withhold_flagged = withhold_flagged
        self.judged: list[JudgedPiece] = []
        self.generated: list[int] = []
        self.error: BaseException | None = None
        self._queue: Queue = Queue()
        self._prompt_length: int | None = None if skip_prompt else 0  # None until the prompt is put
        self._put_count = 0
        self._fallback: SourceDecoder | None = None

    @property
    def should_stop(self) -> bool:
        return self.adapter.flagged or (self.error is not None and not self.fail_open)

    def put(self, value: Any) -> None:
        ids = torch.as_tensor(value)
        if ids.dim() > 1 and ids.shape[0] > 1:
            raise ValueError("GuardedStreamer supports batch size 1 (one conversation per guard session)")
        ids_list = ids.reshape(-1).tolist()
        if self._prompt_length is None:
            self._prompt_length = len(ids_list)
            return
        self._put_count += len(ids_list)
        unseen = self._put_count - len(self.generated)
        if unseen > 0:  # tokens the stopping criterion has not fed already
            self._feed(ids_list[len(ids_list) - unseen :])

    def catch_up(self, input_ids: torch.Tensor) -> None:
        """Feed generated tokens the streamer has not seen yet. transformers
        checks stopping criteria before it streams the step's token, so the
        criterion calls this to judge that token first and stop right at it."""
        if self._prompt_length is None:
            return
        generated = input_ids[0, self._prompt_length :].tolist()
        if len(generated) > len(self.generated):
            self._feed(generated[len(self.generated) :])

    def _feed(self, ids: list[int]) -> None:
        self.generated += ids
        if self.error is not None:
            self._stream_unjudged(ids)
            return
        if self.adapter.flagged:
            return  # generation stops at this step; nothing more is judged
        try:
            pieces = self.adapter.push_ids(ids)
        except Exception as error:
            self._fail(error)
            return
        self._emit(pieces)

    def end(self) -> None:
        if self.error is None and not self.adapter.flagged:
            try:
                self._emit(self.adapter.finish())
            except Exception as error:
                self._fail(error)
        elif self._fallback is not None:
            self._queue.put(GuardedText("".join(p.text for p in self._fallback.flush()), None))
        self._queue.put(_STOP, timeout=self.timeout)

    def __iter__(self) -> GuardedStreamer:
        return self

    def __next__(self) -> GuardedText:
        value = self._queue.get(timeout=self.timeout)
        if value is _STOP:
            if self.error is not None and not self.fail_open:
                raise GuardFailure(f"the guard failed mid-stream and generation was stopped: {self.error}") from (
                    self.error
                )
            raise StopIteration
        return value

    def _emit(self, pieces: list[JudgedPiece]) -> None:
        self.judged += pieces
        for piece in pieces:
            if piece.text and not (self.withhold_flagged and piece.flagged):
                self._queue.put(GuardedText(piece.text, piece), timeout=self.timeout)

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
            self._queue.put(GuardedText(text[shown:], None))

    def _stream_unjudged(self, ids: list[int]) -> None:
        if self._fallback is not None:
            text = "".join(piece.text for piece in self._fallback.push(ids))
            if text:
                self._queue.put(GuardedText(text, None))


class GuardStoppingCriteria(StoppingCriteria):
    """Stops ``generate`` once the streamer's guard flags the response (or fails,
    unless the streamer fails open)."""

    def __init__(self, streamer: GuardedStreamer) -> None:
        self.streamer = streamer

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        self.streamer.catch_up(input_ids)
        return torch.full((input_ids.shape[0],), self.streamer.should_stop, dtype=torch.bool, device=input_ids.device)


@dataclass
class GuardedGeneration:
    """What ``guarded_generate`` produced."""

    text: str
    ids: list[int]
    query_verdict: Any
    pieces: list[JudgedPiece] = field(default_factory=list)
    attempts: int = 1
    flagged: bool = False  # still flagged after the last retry: the text stops before the flagged part


def _first_unsafe_piece(pieces: list[JudgedPiece]) -> int:
    """Source index where the flagged stretch begins: the first piece judged by
    the guard token before ``flagged_at`` (debounce needs two in a row)."""
    flagged_at = next(piece.verdict.flagged_at for piece in pieces if piece.flagged)
    for piece in pieces:
        if piece.verdict is not None and piece.verdict.position >= flagged_at - 1:
            return piece.index
    raise AssertionError("a flagged stream has a flagged piece")


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
    adapter = GuardAdapter(guard.session(policy), tokenizer)
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
        start = _first_unsafe_piece(judged)
        kept = adapter.rollback(start)
        generated = generated[:start]
        judged = [piece for piece in judged if piece.index < kept]  # the rest are judged again
        if attempts > max_retries:
            judged += adapter.finish()
            return GuardedGeneration(
                "".join(p.text for p in judged), generated, query_verdict, judged, attempts, flagged=True
            )
    return GuardedGeneration("".join(p.text for p in judged), generated, query_verdict, judged, attempts)
