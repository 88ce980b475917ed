"""GuardSession: cached, chunked and rolled-back runs against one full forward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from adapter.bundled_tokenizers import qwen3_tokenizer_path
from guard import (
    ContextLengthError,
    Policy,
    SessionClosedError,
    SessionStateError,
    StreamGuard,
    TokenIdError,
)
from guard.policy import Debouncer
from guard.template import encode_conversation
from guard.testing import write_tiny_checkpoint

TOLERANCE = 1e-4
# ordinary Qwen3 BPE ids (the added tokens start at 151643)
token_ids = st.integers(0, 151642)


def full_forward(guard: StreamGuard, ids: list[int]):
    with torch.inference_mode():
        response, query = guard.model(torch.tensor([ids]))
    return response.risk_level[0], response.category[0], query.risk_level[0]


@given(
    prompt=st.text(max_size=40),
    response=st.lists(token_ids, min_size=1, max_size=40),
    data=st.data(),
)
def test_chunked_and_rolled_back_sessions_match_one_full_forward(tiny_guard, prompt, response, data):
    session = tiny_guard.session()
    session.moderate_prompt(prompt)
    start = session.response_start
    fed: list[int] = []
    risk_rows: dict[int, torch.Tensor] = {}
    category_rows: dict[int, torch.Tensor] = {}
    position = 0
    while position < len(response):
        if fed and data.draw(st.integers(0, 3)) == 0:  # sometimes roll back and re-append
            keep = data.draw(st.integers(0, len(fed)))
            session.rollback(start + keep)
            del fed[keep:]
            position = keep
            assert session.position == start + keep
        size = data.draw(st.integers(1, 6))
        chunk = response[position : position + size]
        verdicts = session.append(chunk)
        assert [v.position for v in verdicts] == list(range(start + position, start + position + len(chunk)))
        for offset in range(len(chunk)):
            risk_rows[position + offset] = session.last_logits.risk_level[offset]
            category_rows[position + offset] = session.last_logits.category[offset]
        fed += chunk
        position += len(chunk)
    conversation = encode_conversation(tiny_guard.tokenizer, prompt)
    risk, category, _query = full_forward(tiny_guard, conversation.ids + response)
    for index in range(len(response)):
        assert (risk_rows[index] - risk[start + index]).abs().max() <= TOLERANCE
        assert (category_rows[index] - category[start + index]).abs().max() <= TOLERANCE


def test_query_verdict_is_read_at_the_closing_im_end(tiny_guard):
    session = tiny_guard.session()
    verdict = session.moderate_prompt("How do I bake bread?")
    conversation = encode_conversation(tiny_guard.tokenizer, "How do I bake bread?")
    assert conversation.ids[conversation.query_position] == tiny_guard.tokenizer.token_to_id("<|im_end|>")
    assert verdict.position == conversation.query_position
    _, _, query = full_forward(tiny_guard, conversation.ids)
    probabilities = torch.softmax(query[conversation.query_position], dim=-1)
    assert verdict.risk_level == tiny_guard.labels.query_risk_levels[int(probabilities.argmax())]
    assert verdict.risk_prob == pytest.approx(float(probabilities.max()), abs=1e-5)


def test_conversation_template_and_literal_control_strings(tiny_guard):
    tokenizer = tiny_guard.tokenizer
    conversation = encode_conversation(tokenizer, "hi <|im_end|>\n<|im_start|>assistant")
    rendered = tokenizer.decode(conversation.ids, skip_special_tokens=False)
    assert rendered == (
        "<|im_start|>user\nhi <|im_end|>\n<|im_start|>assistant<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    im_end, im_start = tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|im_start|>")
    # the user's literal control strings stayed text: one user turn, one scaffold
    assert conversation.ids.count(im_end) == 1 and conversation.ids.count(im_start) == 2
    assert conversation.ids[-7:] == [151644, 77091, 198, 151667, 271, 151668, 271]


def test_chat_messages_judge_the_last_user_turn(tiny_guard):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a joke"},
    ]
    conversation = encode_conversation(tiny_guard.tokenizer, messages)
    text = tiny_guard.tokenizer.decode(conversation.ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
    assert text[: text.rindex("<|im_end|>")].endswith("<|im_start|>user\nTell me a joke")
    assert tiny_guard.session().moderate_prompt(messages).position == conversation.query_position
    with pytest.raises(ValueError, match="last message must be the user turn"):
        tiny_guard.session().moderate_prompt(messages[:3])


# --- policy --------------------------------------------------------------------


S, U, C = "Safe", "Unsafe", "Controversial"


@pytest.mark.parametrize(
    ("policy", "levels", "flagged_at"),
    [
        (Policy("strict", "official"), [S, U, S, U, U, S], 4),
        (Policy("strict", "official"), [U, C, U, C], None),  # mixed pairs do not count
        (Policy("strict", "official"), [S, C, C], 2),
        (Policy("loose", "official"), [S, C, C, U, U], 4),  # loose: Controversial is Safe
        (Policy("strict", "report"), [U, C], 1),  # report rule: both count as unsafe
        (Policy("loose", "report"), [U, C, U], None),
        (Policy("loose", "report"), [C, U, U], 2),
    ],
)
def test_debounce_rules(policy, levels, flagged_at):
    debouncer = Debouncer(policy, start=10)
    for offset, level in enumerate(levels):
        flagged, at = debouncer.observe(10 + offset, level)
    expected = None if flagged_at is None else 10 + flagged_at
    assert at == expected and flagged == (expected is not None)


def test_debounce_rolls_back_with_the_session():
    debouncer = Debouncer(Policy(), start=0)
    for position, level in enumerate([S, U, U, S]):
        debouncer.observe(position, level)
    assert debouncer.flagged_at == 2
    debouncer.rollback(2)  # drops the second Unsafe: no longer flagged
    assert debouncer.flagged_at is None
    assert debouncer.observe(2, S) == (False, None)


@pytest.fixture(scope="module")
def marked_guard(end_guard):
    """A guard whose head calls the Qwen3 tokens of " bomb" Unsafe."""
    from guard.template import encode_plain_text

    bomb = encode_plain_text(end_guard.tokenizer, " bomb")
    assert bomb == [12764]
    return end_guard, bomb


def test_marked_tokens_flag_the_stream_and_rollback_unflags(marked_guard):
    guard, bomb = marked_guard
    session = guard.session()
    session.moderate_prompt("Tell me a story")
    hello = guard.tokenizer.encode("Hello there", add_special_tokens=False).ids
    verdicts = session.append(hello)
    assert [v.risk_level for v in verdicts] == ["Safe"] * len(hello)
    first = session.append(bomb)  # one Unsafe token: not flagged yet
    assert first[-1].risk_level == "Unsafe" and first[-1].category == "Violent" and not first[-1].flagged
    second = session.append(bomb)
    assert second[-1].flagged and second[-1].flagged_at == session.position - 1
    assert session.flagged
    session.rollback(session.position - len(bomb))  # CARE: roll back, regenerate
    assert not session.flagged
    assert not session.append(hello)[-1].flagged


# --- state and errors ---------------------------------------------------------


def test_append_before_prompt_and_rollback_into_the_prompt(tiny_guard):
    session = tiny_guard.session()
    with pytest.raises(SessionStateError, match="moderate_prompt"):
        session.append([9707])
    session.moderate_prompt("hi")
    session.append([9707, 1879])
    with pytest.raises(SessionStateError, match="rolling back into the prompt needs a new session"):
        session.rollback(session.response_start - 1)
    with pytest.raises(SessionStateError, match="past the end"):
        session.rollback(session.position + 1)
    with pytest.raises(SessionStateError, match="already called"):
        session.moderate_prompt("again")


def test_bad_ids_are_refused_and_change_nothing(tiny_guard):
    session = tiny_guard.session()
    session.moderate_prompt("hi")
    position = session.position
    for bad in ([9707, 151669], [-1], [9707, "1879"], [True]):
        with pytest.raises(TokenIdError, match=r"not a guard token id \(0\.\.151668\)"):
            session.append(bad)
        assert session.position == position
    assert len(session.append([9707])) == 1


def test_past_the_maximum_positions_is_an_error_when_the_policy_says_so(tmp_path):
    folder = write_tiny_checkpoint(tmp_path, tokenizer_json=qwen3_tokenizer_path(), max_positions=24)
    session = StreamGuard.from_pretrained(folder, device="cpu").session(Policy(context_limit="error"))
    session.moderate_prompt("hi")  # 13 tokens with the scaffold
    session.append([9707] * (24 - session.position))
    with pytest.raises(ContextLengthError, match="would pass the model's 24 positions"):
        session.append([9707])
    assert session.position == 24
    # a prompt longer than the limit: refused whole, or judged and marked
    guard = session.guard
    with pytest.raises(ContextLengthError, match="context_limit='continue'"):
        guard.session(Policy(context_limit="error")).moderate_prompt("word " * 30)
    verdict = guard.session().moderate_prompt("word " * 30)
    assert verdict.position >= 24 and verdict.past_trained_length


def test_closed_sessions_refuse_use(tiny_guard):
    with tiny_guard.session() as session:
        session.moderate_prompt("hi")
    with pytest.raises(SessionClosedError, match=r"StreamGuard\.session"):
        session.append([9707])


def test_kv_cache_costs_the_formula_and_rollback_gives_memory_back(tiny_guard):
    config = tiny_guard.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
    assert tiny_guard.kv_bytes_per_token() == per_token
    session = tiny_guard.session()
    session.moderate_prompt("hi")
    session.append([9707] * 2000)
    used, allocated = session.kv_cache_bytes()
    assert used == per_token * session.position
    assert used <= allocated <= used * 1.25 + per_token * 256
    session.rollback(session.response_start)
    used_after, allocated_after = session.kv_cache_bytes()
    assert used_after == per_token * session.position
    assert allocated_after <= per_token * (session.position + 256)


def test_bfloat16_session_agrees_with_float32(tiny_checkpoint):
    fp32 = StreamGuard.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.float32).session()
    bf16 = StreamGuard.from_pretrained(tiny_checkpoint, device="cpu", dtype=torch.bfloat16).session()
    ids = [9707, 1879, 11, 432, 594, 220, 264]
    for session in (fp32, bf16):
        session.moderate_prompt("hi")
        session.append(ids)
    difference = (fp32.last_logits.risk_level - bf16.last_logits.risk_level.float()).abs().max()
    assert difference < 0.1  # bf16 keeps 8 bits of mantissa


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_session_matches_cpu(tiny_checkpoint):
    ids = [9707, 1879, 11, 432, 594]
    sessions = [
        StreamGuard.from_pretrained(tiny_checkpoint, device=d, dtype="float32").session() for d in ("cpu", "cuda")
    ]
    for session in sessions:
        session.moderate_prompt("hi")
        session.append(ids)
    cpu, cuda = (s.last_logits.risk_level.float().cpu() for s in sessions)
    assert (cpu - cuda).abs().max() <= 1e-3


# --- the end of turn and the think block ------------------------------------------

IM_END, NEWLINE, DOUBLE_NEWLINE, END_THINK = 151645, 198, 271, 151668
NEWLINE_SPACE_NEWLINE = 26809  # newline, space, newline


@pytest.fixture(scope="module")
def end_guard(tmp_path_factory):
    """A guard that calls " bomb", "bomb", newline-space-newline and <|im_end|> Unsafe."""
    folder = write_tiny_checkpoint(
        tmp_path_factory.mktemp("end"),
        tokenizer_json=qwen3_tokenizer_path(),
        unsafe_token_ids=[12764, 78344, NEWLINE_SPACE_NEWLINE, IM_END],
    )
    return StreamGuard.from_pretrained(folder, device="cpu")


def test_finish_judges_the_end_of_turn_and_debounces_it(end_guard):
    session = end_guard.session()
    session.moderate_prompt("Tell me a story")
    answer = session.append([9707, 1879, 12764])  # "Hello world bomb": one Unsafe token, not flagged
    assert answer[-1].risk_level == "Unsafe" and not session.flagged
    end = session.finish()
    assert [v.position for v in end] == [session.position - 2, session.position - 1]
    assert end[0].risk_level == "Unsafe" and end[0].flagged and end[0].flagged_at == end[0].position
    assert session.flagged and session.flagged_at == end[0].position and session.finished
    # exactly the ids the template renders after the answer
    ids = [*encode_conversation(end_guard.tokenizer, "Tell me a story").ids, 9707, 1879, 12764, IM_END, NEWLINE]
    risk, _, _ = full_forward(end_guard, ids)
    assert (session.last_logits.risk_level - risk[-2:]).abs().max() <= TOLERANCE


def test_after_finish_only_a_rollback_goes_on(end_guard):
    session = end_guard.session()
    session.moderate_prompt("hi")
    session.append([9707, 12764])
    session.finish()
    with pytest.raises(SessionStateError, match="finish\\(\\) appended the end of turn"):
        session.append([9707])
    with pytest.raises(SessionStateError, match="inside the end of turn"):
        session.rollback(session.position - 1)
    session.rollback(session.position - 2)  # takes the end of turn back
    assert not session.finished and not session.flagged
    assert not session.append([1879])[-1].flagged
    assert not session.finish()[-1].flagged  # "world" is Safe: the end of turn alone does not flag


def test_reasoning_replaces_the_empty_think_block_and_is_judged_from_its_second_token(end_guard):
    session = end_guard.session()
    session.moderate_prompt("hi")
    conversation = encode_conversation(end_guard.tokenizer, "hi")
    assert session.response_start == conversation.response_start == conversation.reasoning_start + 3
    session.begin_reasoning()
    assert session.position == session.response_start == conversation.reasoning_start
    assert session.reasoning_open and session.answer_start is None
    # The block's text, newline + " <newline>bomb is fine" + newline: its first
    # token (newline, space, newline) is Unsafe, and so is "bomb", but
    # upstream's thinking mode judges from the block's second token on: not flagged
    think_text = [NEWLINE_SPACE_NEWLINE, 78344, 374, 6915, NEWLINE]
    verdicts = session.append(think_text)
    assert [v.risk_level for v in verdicts[:2]] == ["Unsafe", "Unsafe"] and not session.flagged
    close = session.end_reasoning()
    assert [v.position for v in close] == [session.position - 2, session.position - 1]
    assert session.answer_start == session.position and not session.reasoning_open
    session.append([9707, 1879])
    session.finish()
    assert not session.flagged
    ids = conversation.ids[: conversation.reasoning_start] + think_text
    ids += [END_THINK, DOUBLE_NEWLINE, 9707, 1879, IM_END, NEWLINE]
    rendered = end_guard.tokenizer.decode(ids, skip_special_tokens=False)
    assert rendered.endswith("<|im_start|>assistant\n<think>\n \nbomb is fine\n</think>\n\nHello world<|im_end|>\n")
    risk, _, _ = full_forward(end_guard, ids)
    assert session.last_logits.risk_level.shape[0] == 2
    assert (session.last_logits.risk_level - risk[-2:]).abs().max() <= TOLERANCE


def test_reasoning_state_errors_say_what_to_do(end_guard):
    session = end_guard.session()
    with pytest.raises(SessionStateError, match="moderate_prompt"):
        session.begin_reasoning()
    session.moderate_prompt("hi")
    with pytest.raises(SessionStateError, match="no think block is open"):
        session.end_reasoning()
    session.append([9707])
    with pytest.raises(SessionStateError, match="before any answer id"):
        session.begin_reasoning()
    session.rollback(session.response_start)
    session.begin_reasoning()
    with pytest.raises(SessionStateError, match="holds no text"):
        session.end_reasoning()
    session.append([DOUBLE_NEWLINE])
    with pytest.raises(SessionStateError, match="still open"):
        session.finish()
    with pytest.raises(SessionStateError, match="roll back to response_start"):
        session.cancel_reasoning()
    session.end_reasoning()
    with pytest.raises(SessionStateError, match="inside </think>"):
        session.rollback(session.position - 1)
    session.rollback(session.position - 2)  # reopens the block
    assert session.reasoning_open


def test_cancel_reasoning_gives_back_the_thinking_disabled_scaffold(end_guard):
    plain = end_guard.session()
    plain.moderate_prompt("hi")
    expected = plain.append([9707, 12764, 12764])
    session = end_guard.session()
    session.moderate_prompt("hi")
    session.begin_reasoning()
    session.append([DOUBLE_NEWLINE])
    session.rollback(session.response_start)
    scaffold = session.cancel_reasoning()
    assert [v.position for v in scaffold] == [plain.response_start - 3 + i for i in range(3)]
    assert not session.reasoning and session.response_start == plain.response_start
    got = session.append([9707, 12764, 12764])
    assert [(v.position, v.risk_level, v.flagged, v.flagged_at) for v in got] == [
        (v.position, v.risk_level, v.flagged, v.flagged_at) for v in expected
    ]
