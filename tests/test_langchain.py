"""The LangChain handler against langchain-core's own streaming fake chat model."""

from __future__ import annotations

import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from adapter.bundled_tokenizers import qwen3_tokenizer, qwen3_tokenizer_path
from adapter.retokenize import encode_ordinary
from guard import StreamGuard
from guard.testing import write_tiny_checkpoint
from integrations.langchain import GuardCallbackHandler, GuardFlaggedError

ANSWER = "Stumps are easy: dig around them, or use dynamite dynamite for speed, then rake the soil."


@pytest.fixture(scope="module")
def guard(tmp_path_factory):
    """Calls the Qwen3 tokens of " dynamite" Unsafe, everything else Safe."""
    unsafe = encode_ordinary(qwen3_tokenizer(), " dynamite")
    folder = write_tiny_checkpoint(
        tmp_path_factory.mktemp("lc"), tokenizer_json=qwen3_tokenizer_path(), unsafe_token_ids=unsafe
    )
    return StreamGuard.from_pretrained(folder, device="cpu")


def chat_model(answer: str) -> GenericFakeChatModel:
    return GenericFakeChatModel(messages=iter([AIMessage(content=answer)]))


def test_a_flag_stops_the_stream_before_the_flagged_chunk(guard):
    handler = GuardCallbackHandler(guard)
    received = []
    with pytest.raises(GuardFlaggedError, match="flagged the response") as raised:
        for chunk in chat_model(ANSWER).stream(
            [HumanMessage("How do I remove stumps?")], config={"callbacks": [handler]}
        ):
            received.append(chunk.content)
    shown = "".join(received)
    # " dynamite" is two Qwen tokens, both Unsafe: the flag comes when the
    # space after the word makes it final, and that chunk never reaches the caller.
    assert len(encode_ordinary(qwen3_tokenizer(), " dynamite")) == 2
    assert shown == ANSWER[: ANSWER.index(" dynamite") + len(" dynamite")]
    flagged = [piece for piece in raised.value.pieces if piece.flagged]
    assert flagged and flagged[0].verdict.risk_level == "Unsafe" and flagged[0].verdict.category == "Violent"


def test_a_safe_answer_streams_whole_with_every_chunk_judged(guard):
    handler = GuardCallbackHandler(guard)
    answer = "Dig around the stump, cut the roots, and lever it out."
    messages = [SystemMessage("Be brief."), HumanMessage("How do I remove stumps?")]
    chunks = [chunk.content for chunk in chat_model(answer).stream(messages, config={"callbacks": [handler]})]
    assert "".join(chunks) == answer
    (judged,) = handler.judged.values()
    assert "".join(piece.text for piece in judged) == answer
    assert all(piece.verdict.risk_level == "Safe" for piece in judged if piece.verdict is not None)


def test_invoke_raises_too(guard):
    with pytest.raises(GuardFlaggedError):
        chat_model(ANSWER).invoke("How do I remove stumps?", config={"callbacks": [GuardCallbackHandler(guard)]})
