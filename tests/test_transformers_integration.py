"""The transformers integration with a tiny real generator: a 2-layer Llama
with the Mistral v1 (Llama-2 style, byte fallback) vocabulary, random weights,
really running ``generate``."""

from __future__ import annotations

from threading import Thread

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList, StoppingCriteriaList

from adapter import AdapterError, GuardAdapter
from adapter.bundled_tokenizers import generator_tokenizer, qwen3_tokenizer, qwen3_tokenizer_path
from adapter.retokenize import encode_ordinary
from guard import StreamGuard
from guard.testing import write_tiny_checkpoint
from integrations.transformers import (
    GuardedStreamer,
    GuardFailure,
    GuardStoppingCriteria,
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


def generate(model, streamer=None, criteria=None, prompt=PROMPT, max_new_tokens=48):
    torch.manual_seed(SEED)
    output = model.generate(
        input_ids=torch.tensor([prompt]),
        attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=True,
        logits_processor=LogitsProcessorList([FavourBytes()]),
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList(criteria or []),
        eos_token_id=None,
    )
    return output[0, len(prompt) :].tolist()


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
