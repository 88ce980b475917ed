"""The transformers integration with a tiny real generator: a 2-layer Llama
with the Mistral v1 (Llama-2 style, byte fallback) vocabulary, random weights,
really running ``generate``."""

from __future__ import annotations

import itertools
from threading import Thread

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList, StoppingCriteriaList

from adapter import AdapterError, GuardAdapter, JudgedPiece
from adapter.bundled_tokenizers import generator_tokenizer, qwen3_tokenizer, qwen3_tokenizer_path
from adapter.retokenize import encode_ordinary
from guard import SessionClosedError, StreamGuard
from guard.testing import write_tiny_checkpoint
from integrations.transformers import (
    GuardedStreamer,
    GuardFailure,
    GuardStoppingCriteria,
    _first_unsafe_piece,
    guarded_generate,
)

BYTE_IDS = range(3, 259)  # <0x00>..<0xFF> in the Mistral v1 vocabulary
PROMPT = [1, 22557, 28725]  # <s> Hello,
SEED = 1234


class FavourBytes(LogitsProcessor):
    """Make the random generator byte-fallback heavy: two steps in three may
    only take byte tokens (<0x00>..<0xFF>), so byte runs of two alternate with
    ordinary pieces."""

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] % 3:
            bonus = torch.full_like(scores, -1e4)
            bonus[:, BYTE_IDS.start : BYTE_IDS.stop] = 0.0
            scores = scores + bonus
        return scores


@pytest.fixture(scope="module")
def tokenizer():
    return generator_tokenizer("mistral-v1")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def generate(model, streamer=None, criteria=None, prompt=PROMPT, max_new_tokens=48, rows=1, **kwargs):
    """The generated ids (of row 0, or of every row when ``rows`` > 1)."""
    torch.manual_seed(SEED)
    output = model.generate(
        input_ids=torch.tensor([prompt] * rows),
        attention_mask=torch.ones((rows, len(prompt)), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=True,
        logits_processor=LogitsProcessorList([FavourBytes()]),
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList(criteria or []),
        eos_token_id=None,
        **kwargs,
    )
    generated = [row[len(prompt) :].tolist() for row in output]
    return generated if len(generated) > 1 else generated[0]


@pytest.fixture(scope="module")
def unguarded(model):
    return generate(model)


def marked_guard(folder, qwen_ids):
    write_tiny_checkpoint(folder, tokenizer_json=qwen3_tokenizer_path(), unsafe_token_ids=qwen_ids)
    return StreamGuard.from_pretrained(folder, device="cpu")


def first_flag_offline(guard, tokenizer, ids):
    """Index of the generator token whose push makes the guard flag."""
    adapter = GuardAdapter(guard.session(), tokenizer)
    adapter.moderate_prompt("Hello,")
    for index, token_id in enumerate(ids):
        if any(piece.flagged for piece in adapter.push_ids(token_id)):
            return index
    return None


def test_the_tiny_generator_really_generates_byte_heavy_text(unguarded, tokenizer):
    assert len(unguarded) == 48
    assert sum(token in BYTE_IDS for token in unguarded) == 32
    assert "\ufffd" in tokenizer.decode(unguarded) or any(ord(c) > 127 for c in tokenizer.decode(unguarded))


def test_generation_stops_at_the_flagged_token(model, tokenizer, unguarded, tmp_path):
    text = tokenizer.decode(unguarded, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    qwen_ids = encode_ordinary(qwen3_tokenizer(), text)
    middle = len(qwen_ids) // 2
    guard = marked_guard(tmp_path, qwen_ids[middle : middle + 2])
    stop_at = first_flag_offline(guard, tokenizer, unguarded)
    assert stop_at is not None and stop_at < len(unguarded) - 1

    streamer = GuardedStreamer(GuardAdapter(guard.session(), tokenizer))
    streamer.adapter.moderate_prompt("Hello,")
    thread = Thread(target=lambda: generated.extend(generate(model, streamer, [GuardStoppingCriteria(streamer)])))
    generated: list[int] = []
    thread.start()
    chunks = list(streamer)  # the TextIteratorStreamer pattern
    thread.join()
    assert generated == unguarded[: stop_at + 1]  # generate halted right after the flagging token
    assert streamer.adapter.flagged
    assert all(chunk.verdict is not None and not chunk.verdict.flagged for chunk in chunks)  # flagged text withheld
    shown = "".join(chunks)
    assert text.startswith(shown)
    flagged = next(piece for piece in streamer.judged if piece.flagged)
    assert flagged.verdict.risk_level == "Unsafe"


def test_guarded_generate_rolls_back_and_retries_a_bounded_number_of_times(model, tokenizer, tmp_path):
    # Greedy decoding repeats itself, so every retry is flagged again.
    greedy = model.generate(input_ids=torch.tensor([PROMPT]), max_new_tokens=30, do_sample=False, eos_token_id=None)
    greedy = greedy[0, len(PROMPT) :].tolist()
    text = tokenizer.decode(greedy, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    qwen_ids = encode_ordinary(qwen3_tokenizer(), text)
    guard = marked_guard(tmp_path, qwen_ids[len(qwen_ids) // 2 :][:2])
    result = guarded_generate(
        model, tokenizer, guard, "Hello,", input_ids=PROMPT, max_new_tokens=30, max_retries=2, do_sample=False,
        eos_token_id=None,
    )  # fmt: skip
    assert result.attempts == 3 and result.flagged
    assert greedy[: len(result.ids)] == result.ids and len(result.ids) < len(greedy)
    assert result.text == tokenizer.decode(result.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert not any(piece.flagged for piece in result.pieces)


def test_guarded_generate_without_a_flag_is_one_attempt(model, tokenizer, tmp_path):
    calm = marked_guard(tmp_path, [151642])  # everything else is Safe for this guard
    result = guarded_generate(
        model, tokenizer, calm, "Hello,", input_ids=PROMPT, max_new_tokens=20, do_sample=False, eos_token_id=None
    )
    assert result.attempts == 1 and not result.flagged
    assert all(p.verdict.risk_level == "Safe" for p in result.pieces if p.verdict is not None)
    assert len(result.ids) == 20
    assert result.text == tokenizer.decode(result.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert [p.index for p in result.pieces] == list(range(20))


@pytest.fixture
def short_guard(tmp_path):
    """A guard that calls everything Safe and has room for 30 positions: the
    prompt and scaffold take about 14, so it fails mid-stream with
    ContextLengthError."""
    write_tiny_checkpoint(tmp_path, tokenizer_json=qwen3_tokenizer_path(), max_positions=30, unsafe_token_ids=[151642])
    return StreamGuard.from_pretrained(tmp_path, device="cpu")


def test_fail_closed_when_the_guard_raises(model, tokenizer, short_guard):
    streamer = GuardedStreamer(GuardAdapter(short_guard.session(), tokenizer))
    streamer.adapter.moderate_prompt("Hello,")
    generated = generate(model, streamer, [GuardStoppingCriteria(streamer)])
    assert len(generated) < 48  # generation stopped
    assert not streamer.adapter.flagged
    with pytest.raises(GuardFailure, match="would pass the model's 30 positions"):
        list(streamer)
    # the adapter refuses to go on rather than skip the tokens it never judged
    with pytest.raises(AdapterError, match="start a new session"):
        streamer.adapter.push_ids([22557])


def test_fail_open_only_when_asked(model, tokenizer, short_guard, unguarded):
    streamer = GuardedStreamer(GuardAdapter(short_guard.session(), tokenizer), fail_open=True)
    streamer.adapter.moderate_prompt("Hello,")
    generated = generate(model, streamer, [GuardStoppingCriteria(streamer)])
    chunks = list(streamer)
    assert generated == unguarded
    assert any(chunk.verdict is None for chunk in chunks)  # the unjudged rest
    text = tokenizer.decode(unguarded, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert "".join(chunks) == text


# --- the stopping criterion on its own, batches, beams -------------------------------------


def decoded(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def all_closed(criterion) -> bool:
    for streamer in criterion.streamers:
        with pytest.raises(SessionClosedError):
            streamer.adapter.session.append([])
    return True


def flagging_pairs(qwen_ids) -> set[tuple[int, int]]:
    return set(itertools.pairwise(qwen_ids))


@pytest.fixture(scope="module")
def flagging(model, tokenizer, unguarded, tmp_path_factory):
    """A guard that flags the unguarded answer in its middle, and the index
    of the generator token whose push makes it flag."""
    qwen_ids = encode_ordinary(qwen3_tokenizer(), decoded(tokenizer, unguarded))
    middle = len(qwen_ids) // 2
    guard = marked_guard(tmp_path_factory.mktemp("flagging"), qwen_ids[middle : middle + 2])
    stop_at = first_flag_offline(guard, tokenizer, unguarded)
    assert stop_at is not None and stop_at < len(unguarded) - 1
    return guard, stop_at


@pytest.mark.parametrize("form", ["guard", "adapter", "streamer not passed to generate"])
def test_the_criterion_alone_judges_and_stops_at_the_flag(model, tokenizer, unguarded, flagging, form):
    guard, stop_at = flagging
    if form == "guard":
        criterion = GuardStoppingCriteria(guard, tokenizer, prompt="Hello,")
    elif form == "adapter":
        criterion = GuardStoppingCriteria(GuardAdapter(guard.session(), tokenizer), prompt="Hello,")
    else:  # the streamer form, with the streamer left out of generate()
        streamer = GuardedStreamer(GuardAdapter(guard.session(), tokenizer))
        streamer.adapter.moderate_prompt("Hello,")
        criterion = GuardStoppingCriteria(streamer)
    generated = generate(model, criteria=[criterion])
    assert generated == unguarded[: stop_at + 1]  # halted right after the flagging token
    assert criterion.stopped_at == [stop_at + 1]
    assert criterion.finish() == [True]
    assert [piece.index for piece in criterion.pieces[0]] == list(range(len(criterion.pieces[0])))
    if form == "streamer not passed to generate":
        assert all(not chunk.verdict.flagged for chunk in streamer)  # finish() ended it: iterating does not hang


def test_the_criterion_alone_lets_a_safe_answer_run_and_judges_its_end(model, tokenizer, unguarded, tmp_path):
    calm = marked_guard(tmp_path, [151642])
    criterion = GuardStoppingCriteria(calm, tokenizer, prompt=[{"role": "user", "content": "Hello,"}])
    assert generate(model, criteria=[criterion]) == unguarded
    assert criterion.finish() == [False]
    (pieces,) = criterion.pieces
    assert [piece.index for piece in pieces] == list(range(len(unguarded)))  # every token judged, the tail too
    assert "".join(piece.text for piece in pieces) == decoded(tokenizer, unguarded)
    assert criterion.query_verdicts[0] is not None


@pytest.fixture(scope="module")
def two_rows(model):
    return generate(model, rows=2)


@pytest.fixture(scope="module")
def row_one_flagging(tokenizer, two_rows, tmp_path_factory):
    """A guard that flags row 1 in its middle and not row 0."""
    qwen = qwen3_tokenizer()
    row_zero = flagging_pairs(encode_ordinary(qwen, decoded(tokenizer, two_rows[0])))
    row_one = encode_ordinary(qwen, decoded(tokenizer, two_rows[1]))
    for start in range(len(row_one) // 2, len(row_one) - 1):
        marked = set(row_one[start : start + 2])
        if not any(a in marked and b in marked for a, b in row_zero):
            break
    guard = marked_guard(tmp_path_factory.mktemp("row-one"), sorted(marked))
    assert first_flag_offline(guard, tokenizer, two_rows[0]) is None
    stop_at = first_flag_offline(guard, tokenizer, two_rows[1])
    assert stop_at is not None and stop_at < len(two_rows[1]) - 1
    return guard, stop_at


@pytest.mark.parametrize("batch", ["num_return_sequences=2", "two rows, prompts=[...]"])
def test_every_batch_row_is_judged_and_only_the_flagged_row_stops(model, tokenizer, two_rows, row_one_flagging, batch):
    guard, stop_at = row_one_flagging
    if batch == "num_return_sequences=2":
        criterion = GuardStoppingCriteria(guard, tokenizer, prompt="Hello,")
        generated = generate(model, criteria=[criterion], num_return_sequences=2)
    else:
        criterion = GuardStoppingCriteria(guard, tokenizer, prompts=["Hello,", "Hello, again"])
        generated = generate(model, criteria=[criterion], rows=2)
    assert generated[0] == two_rows[0]  # row 0 ran to the end
    assert generated[1][: stop_at + 1] == two_rows[1][: stop_at + 1]
    assert criterion.stopped_at == [None, stop_at + 1]  # row 1 was stopped at its flag
    assert criterion.finish() == [False, True]
    assert all_closed(criterion)
    assert len(criterion.query_verdicts) == 2
    assert "".join(piece.text for piece in criterion.pieces[0]) == decoded(tokenizer, two_rows[0])
    assert criterion.pieces[1] and not any(piece.index > stop_at for piece in criterion.pieces[1])


def test_beam_search_is_refused_loudly_at_the_first_call(model, tokenizer, flagging):
    guard, _ = flagging
    criterion = GuardStoppingCriteria(guard, tokenizer, prompt="Hello,")
    with pytest.raises(ValueError, match=r"cannot follow beam search.*num_beams=1"):
        model.generate(
            input_ids=torch.tensor([PROMPT]), max_new_tokens=8, num_beams=2, do_sample=False, eos_token_id=None,
            stopping_criteria=StoppingCriteriaList([criterion]),
        )  # fmt: skip
    assert all_closed(criterion)  # the refused criterion freed its guard sessions
    # Rows that change between steps (as beams do) are refused too, however
    # the criterion is called.
    criterion = GuardStoppingCriteria(guard, tokenizer, prompt="Hello,")
    criterion(torch.tensor([[*PROMPT, 400], [*PROMPT, 500]]), None)
    with pytest.raises(ValueError, match="rows of input_ids changed"):
        criterion(torch.tensor([[*PROMPT, 500, 600], [*PROMPT, 400, 700]]), None)


def test_wrong_usage_says_what_to_do(model, tokenizer, flagging):
    guard, _ = flagging
    with pytest.raises(TypeError, match="generator's tokenizer"):
        GuardStoppingCriteria(guard, prompt="Hello,")
    with pytest.raises(TypeError, match=r"prompt=\.\.\. .* or prompts="):
        GuardStoppingCriteria(guard, tokenizer)
    with pytest.raises(TypeError, match="moderate_prompt"):
        GuardStoppingCriteria(GuardAdapter(guard.session(), tokenizer))
    streamer = GuardedStreamer(GuardAdapter(guard.session(), tokenizer))
    streamer.adapter.moderate_prompt("Hello,")
    with pytest.raises(ValueError, match=r"prompts=\[\.\.\.\]"):
        generate(model, criteria=[GuardStoppingCriteria(streamer)], rows=2)
    criterion = GuardStoppingCriteria(guard, tokenizer, prompts=["a", "b"])
    with pytest.raises(ValueError, match="3 rows for 2 prompts"):
        generate(model, criteria=[criterion], rows=3)
    criterion = GuardStoppingCriteria(guard, tokenizer, prompt="Hello,")
    with pytest.raises(ValueError, match=r"prompt_length=input_ids\.shape"):
        model.generate(
            input_ids=torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False, assistant_model=model,
            eos_token_id=None, stopping_criteria=StoppingCriteriaList([criterion]),
        )  # fmt: skip


def test_assisted_generation_with_the_prompt_length(model, tokenizer, tmp_path):
    calm = marked_guard(tmp_path, [151642])
    criterion = GuardStoppingCriteria(calm, tokenizer, prompt="Hello,", prompt_length=len(PROMPT))
    output = model.generate(
        input_ids=torch.tensor([PROMPT]), max_new_tokens=9, do_sample=False, assistant_model=model,
        eos_token_id=None, stopping_criteria=StoppingCriteriaList([criterion]),
    )  # fmt: skip
    assert criterion.finish() == [False]
    assert [piece.index for piece in criterion.pieces[0]] == list(range(output.shape[1] - len(PROMPT)))


def test_criterion_alone_fails_closed_and_open(model, tokenizer, short_guard, unguarded):
    criterion = GuardStoppingCriteria(short_guard, tokenizer, prompt="Hello,")
    with pytest.raises(GuardFailure, match="30 positions"):
        generate(model, criteria=[criterion])
    with pytest.raises(GuardFailure, match="30 positions"):
        criterion.finish()
    assert all_closed(criterion)
    criterion = GuardStoppingCriteria(short_guard, tokenizer, prompt="Hello,", fail_open=True)
    assert generate(model, criteria=[criterion]) == unguarded
    assert criterion.finish() == [False]


# --- withhold_flagged=False, skip_prompt=False ---------------------------------------------------


def test_withhold_flagged_false_streams_everything_and_generation_goes_on(model, tokenizer, unguarded, flagging):
    guard, stop_at = flagging
    streamer = GuardedStreamer(GuardAdapter(guard.session(), tokenizer), withhold_flagged=False)
    streamer.adapter.moderate_prompt("Hello,")
    generated: list[int] = []
    thread = Thread(target=lambda: generated.extend(generate(model, streamer, [GuardStoppingCriteria(streamer)])))
    thread.start()
    chunks = list(streamer)
    thread.join()
    assert generated == unguarded  # not stopped
    assert "".join(chunks) == decoded(tokenizer, unguarded)  # everything streamed, judged
    assert any(chunk.verdict is not None and chunk.verdict.flagged for chunk in chunks)
    assert all(chunk.verdict is not None for chunk in chunks if chunk)

    # ... unless the criterion is asked to stop
    streamer = GuardedStreamer(GuardAdapter(guard.session(), tokenizer), withhold_flagged=False)
    streamer.adapter.moderate_prompt("Hello,")
    assert generate(model, streamer, [GuardStoppingCriteria(streamer, stop_on_flag=True)]) == unguarded[: stop_at + 1]


def test_skip_prompt_false_streams_the_prompt_unjudged(model, tokenizer, tmp_path):
    calm = marked_guard(tmp_path, [151642])
    streamer = GuardedStreamer(GuardAdapter(calm.session(), tokenizer), skip_prompt=False)
    streamer.adapter.moderate_prompt("Hello,")
    generated = generate(model, streamer, [GuardStoppingCriteria(streamer)], max_new_tokens=6)
    chunks = list(streamer)
    assert chunks[0] == "Hello," and chunks[0].verdict is None
    assert [piece.index for piece in streamer.judged] == list(range(6))  # the prompt is not judged as response
    assert "".join(chunks[1:]) == decoded(tokenizer, generated)


# --- CARE: where the flagged stretch begins -------------------------------------------------------


def test_first_unsafe_piece_never_raises_when_no_piece_carries_the_flag(tmp_path):
    guard = marked_guard(tmp_path, encode_ordinary(qwen3_tokenizer(), " dynamite"))
    adapter = GuardAdapter(guard.session())
    adapter.moderate_prompt("How do I remove stumps?")
    pieces: list[JudgedPiece] = []
    for delta in ["Dig", " around", " it, or use dynamite dynamite on"]:
        pieces += adapter.push_text(delta)
    assert adapter.flagged
    assert not any(piece.flagged for piece in pieces)  # the flagging delta is not judged yet
    start = _first_unsafe_piece(pieces, adapter)
    assert 0 <= start <= 2
    assert _first_unsafe_piece([], adapter) == 0
    kept = adapter.rollback(start)
    assert not adapter.flagged and kept <= start
