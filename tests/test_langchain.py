"""The LangChain handler against langchain-core's own fake chat models, sync and async."""

from __future__ import annotations

import asyncio
import json

import pytest
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel, GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, ChatMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult

from adapter.bundled_tokenizers import qwen3_tokenizer, qwen3_tokenizer_path
from adapter.retokenize import encode_ordinary
from guard import SessionClosedError, StreamGuard
from guard.template import encode_conversation
from guard.testing import write_tiny_checkpoint
from integrations.langchain import (
    GuardCallbackHandler,
    GuardFlaggedError,
    GuardSetupError,
    conversation_from_messages,
)
from integrations.streams import StreamKey
from tests.test_template import real_template_renderer

ANSWER = "Stumps are easy: dig around them, or use dynamite dynamite for speed, then rake the soil."
SAFE = "Dig around the stump, cut the roots, and lever it out."
TEXT = StreamKey()


@pytest.fixture(scope="module")
def guard(tmp_path_factory):
    """Calls the Qwen3 tokens of " dynamite" Unsafe, everything else Safe
    (its random query head calls every prompt Unsafe)."""
    unsafe = encode_ordinary(qwen3_tokenizer(), " dynamite")
    folder = write_tiny_checkpoint(
        tmp_path_factory.mktemp("lc"), tokenizer_json=qwen3_tokenizer_path(), unsafe_token_ids=unsafe
    )
    return StreamGuard.from_pretrained(folder, device="cpu")


class SessionLedger:
    """The real guard, keeping a list of every session it opens."""

    def __init__(self, guard):
        self.guard = guard
        self.sessions = []

    def session(self, policy=None):
        session = self.guard.session(policy)
        self.sessions.append(session)
        return session

    def __getattr__(self, name):
        return getattr(self.guard, name)

    def all_closed(self) -> bool:
        for session in self.sessions:
            try:
                session.append([])
            except SessionClosedError:
                continue
            return False
        return True


def chat_model(answer: str | AIMessage) -> GenericFakeChatModel:
    return GenericFakeChatModel(messages=iter([answer if isinstance(answer, AIMessage) else AIMessage(content=answer)]))


class TwoAnswersChatModel(FakeMessagesListChatModel):
    """FakeMessagesListChatModel answering with two generations at once, as a
    provider does for ``n=2``."""

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        first = super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)
        second = super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)
        return ChatResult(generations=first.generations + second.generations)


class ScriptedChunksChatModel(GenericFakeChatModel):
    """GenericFakeChatModel whose stream yields the given chunks as they are,
    calling ``on_llm_new_token`` the way provider integrations do (the text of
    a tool-call chunk is empty; its arguments are in ``tool_call_chunks``)."""

    chunks: list[AIMessageChunk]

    def _stream(self, messages, stop=None, run_manager=None, **kwargs):
        for message in self.chunks:
            chunk = ChatGenerationChunk(message=message)
            if run_manager:
                run_manager.on_llm_new_token(message.content, chunk=chunk)
            yield chunk


def scripted(chunks) -> ScriptedChunksChatModel:
    return ScriptedChunksChatModel(messages=iter([]), chunks=chunks)


def text_of(pieces) -> str:
    return "".join(piece.text for piece in pieces)


# --- the message text ---------------------------------------------------------


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
    assert raised.value.stream == TEXT
    assert handler.live_sessions == 0


def test_a_safe_answer_streams_whole_with_every_chunk_judged(guard):
    handler = GuardCallbackHandler(guard)
    messages = [SystemMessage("Be brief."), HumanMessage("How do I remove stumps?")]
    chunks = [chunk.content for chunk in chat_model(SAFE).stream(messages, config={"callbacks": [handler]})]
    assert "".join(chunks) == SAFE
    (judged,) = handler.judged.values()
    assert list(judged) == [TEXT]
    assert text_of(judged[TEXT]) == SAFE
    assert all(piece.verdict.risk_level == "Safe" for piece in judged[TEXT] if piece.verdict is not None)
    assert handler.live_sessions == 0


def test_invoke_raises_too(guard):
    with pytest.raises(GuardFlaggedError):
        chat_model(ANSWER).invoke("How do I remove stumps?", config={"callbacks": [GuardCallbackHandler(guard)]})


def test_async_stream_and_invoke(guard):
    async def scenario():
        handler = GuardCallbackHandler(guard)
        received = []
        with pytest.raises(GuardFlaggedError):
            async for chunk in chat_model(ANSWER).astream("How do I remove stumps?", config={"callbacks": [handler]}):
                received.append(chunk.content)
        assert "".join(received) == ANSWER[: ANSWER.index(" dynamite") + len(" dynamite")]
        safe = await chat_model(SAFE).ainvoke("How do I remove stumps?", config={"callbacks": [handler]})
        with pytest.raises(GuardFlaggedError):
            await TwoAnswersChatModel(responses=[AIMessage(SAFE), AIMessage(ANSWER)]).ainvoke(
                "How?", config={"callbacks": [handler]}
            )
        return safe, handler

    safe, handler = asyncio.run(scenario())
    assert safe.content == SAFE
    assert handler.live_sessions == 0


# --- n > 1 ----------------------------------------------------------------------


def test_every_generation_is_judged_not_only_the_first(guard):
    handler = GuardCallbackHandler(guard)
    model = TwoAnswersChatModel(responses=[AIMessage(SAFE), AIMessage(ANSWER)])
    with pytest.raises(GuardFlaggedError, match="choice 1 text") as raised:
        model.invoke("How do I remove stumps?", config={"callbacks": [handler]})
    assert raised.value.stream == StreamKey(choice=1)
    with pytest.raises(GuardFlaggedError):
        model.generate([[HumanMessage("How do I remove stumps?")]], callbacks=[handler])

    calm = GuardCallbackHandler(guard)
    result = TwoAnswersChatModel(responses=[AIMessage(SAFE), AIMessage("Rent a stump grinder.")]).generate(
        [[HumanMessage("How?")]], callbacks=[calm]
    )
    assert len(result.generations[0]) == 2
    (judged,) = calm.judged.values()
    assert {key: text_of(pieces) for key, pieces in judged.items()} == {
        StreamKey(0): SAFE,
        StreamKey(1): "Rent a stump grinder.",
    }


# --- tool calls -----------------------------------------------------------------


def raw_tool_call(arguments: str, name: str = "search", call_id: str = "call_1", index: int = 0) -> dict:
    return {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


UNSAFE_ARGUMENTS = '{"query": "use dynamite on stumps"}'


def test_streamed_tool_call_arguments_are_judged(guard):
    # GenericFakeChatModel streams OpenAI-style raw tool calls as one chunk
    # whose text is empty and whose tool_call_chunks carry the arguments.
    message = AIMessage(content="", additional_kwargs={"tool_calls": [raw_tool_call(UNSAFE_ARGUMENTS)]})
    handler = GuardCallbackHandler(guard)
    with pytest.raises(GuardFlaggedError, match="tool call 0 arguments") as raised:
        list(chat_model(message).stream("Remove my stumps", config={"callbacks": [handler]}))
    assert raised.value.stream == StreamKey(0, 0)
    assert UNSAFE_ARGUMENTS.startswith(text_of(raised.value.pieces))

    exempt = GuardCallbackHandler(guard, judge_tool_calls=False)
    message = AIMessage(content="", additional_kwargs={"tool_calls": [raw_tool_call(UNSAFE_ARGUMENTS)]})
    chunks = list(chat_model(message).stream("Remove my stumps", config={"callbacks": [exempt]}))
    assert any(chunk.tool_call_chunks for chunk in chunks)


def test_interleaved_tool_call_chunks_are_one_stream_per_call_in_the_order_generated(guard):
    chunks = [
        AIMessageChunk(content="Looking", tool_call_chunks=[]),
        AIMessageChunk(content="", tool_call_chunks=[{"name": "search", "args": "", "id": "a", "index": 0}]),
        AIMessageChunk(content="", tool_call_chunks=[{"args": '{"query": "rent a', "index": 0}]),
        AIMessageChunk(
            content="", tool_call_chunks=[{"name": "notes", "args": '{"text": "stumps', "id": "b", "index": 1}]
        ),
        AIMessageChunk(content="", tool_call_chunks=[{"args": ' grinder"}', "index": 0}]),
        AIMessageChunk(content="", tool_call_chunks=[{"args": ' and roots"}', "index": 1}]),
    ]
    handler = GuardCallbackHandler(guard)
    streamed = list(scripted(chunks).stream("Plan", config={"callbacks": [handler]}))
    assert len(streamed) >= len(chunks)
    (judged,) = handler.judged.values()
    assert {key: text_of(pieces) for key, pieces in judged.items()} == {
        TEXT: "Looking",
        StreamKey(0, 0): '{"query": "rent a grinder"}',
        StreamKey(0, 1): '{"text": "stumps and roots"}',
    }

    chunks[-1] = AIMessageChunk(content="", tool_call_chunks=[{"args": ' and dynamite dynamite"}', "index": 1}])
    handler = GuardCallbackHandler(guard)
    received = []
    with pytest.raises(GuardFlaggedError) as raised:
        for chunk in scripted(chunks).stream("Plan", config={"callbacks": [handler]}):
            received.append(chunk)
    assert raised.value.stream == StreamKey(0, 1)
    assert len(received) == len(chunks) - 1  # the flagged chunk never reached the caller
    assert handler.live_sessions == 0


def test_a_tool_call_only_message_is_judged_on_invoke(guard):
    call = {"name": "search", "args": json.loads(UNSAFE_ARGUMENTS), "id": "call_1"}
    model = FakeMessagesListChatModel(responses=[AIMessage(content="", tool_calls=[call])])
    with pytest.raises(GuardFlaggedError) as raised:
        model.invoke("Remove my stumps", config={"callbacks": [GuardCallbackHandler(guard)]})
    assert raised.value.stream == StreamKey(0, 0)
    assert text_of(raised.value.pieces) in UNSAFE_ARGUMENTS

    exempt = GuardCallbackHandler(guard, judge_tool_calls=False)
    model = FakeMessagesListChatModel(responses=[AIMessage(content="", tool_calls=[call])])
    assert model.invoke("Remove my stumps", config={"callbacks": [exempt]}).tool_calls[0]["args"] == call["args"]

    async def asynchronous():
        model = FakeMessagesListChatModel(responses=[AIMessage(content="", tool_calls=[call])])
        await model.ainvoke("Remove my stumps", config={"callbacks": [GuardCallbackHandler(guard)]})

    with pytest.raises(GuardFlaggedError):
        asyncio.run(asynchronous())


def test_legacy_function_call_arguments_are_judged(guard):
    message = AIMessage(
        content="", additional_kwargs={"function_call": {"name": "search", "arguments": UNSAFE_ARGUMENTS}}
    )
    with pytest.raises(GuardFlaggedError):
        list(chat_model(message).stream("Remove my stumps", config={"callbacks": [GuardCallbackHandler(guard)]}))


# --- sessions are freed on every path ------------------------------------------------


def test_refused_prompts_leave_no_session_alive(guard):
    ledger = SessionLedger(guard)
    handler = GuardCallbackHandler(ledger, block_unsafe_prompts=True)
    for number in range(20):
        with pytest.raises(GuardFlaggedError, match="judged the prompt"):
            chat_model(SAFE).invoke(f"Question {number}", config={"callbacks": [handler]})
    assert len(ledger.sessions) == 20
    assert handler.live_sessions == 0
    assert ledger.all_closed()


def test_every_path_closes_its_sessions(guard):
    ledger = SessionLedger(guard)
    handler = GuardCallbackHandler(ledger)
    config = {"callbacks": [handler]}
    list(chat_model(SAFE).stream("a", config=config))  # a normal end
    chat_model(SAFE).invoke("b", config=config)
    with pytest.raises(GuardFlaggedError):
        list(chat_model(ANSWER).stream("c", config=config))  # flagged mid-stream
    with pytest.raises(GuardFlaggedError):
        TwoAnswersChatModel(responses=[AIMessage(SAFE), AIMessage(ANSWER)]).invoke("d", config=config)  # at the end
    with pytest.raises(StopIteration):
        GenericFakeChatModel(messages=iter([])).invoke("e", config=config)  # the model fails
    with pytest.raises(GuardFlaggedError):
        FakeMessagesListChatModel(
            responses=[AIMessage("", tool_calls=[{"name": "s", "args": {"q": "dynamite dynamite now"}, "id": "1"}])]
        ).invoke("f", config=config)
    assert len(ledger.sessions) >= 7
    assert handler.live_sessions == 0
    assert ledger.all_closed()


# --- the conversation ---------------------------------------------------------------


CALL = {"name": "search", "args": {"query": "stump grinder hire"}, "id": "call_1"}
CALL_DICT = {"type": "function", "function": {"name": "search", "arguments": {"query": "stump grinder hire"}}}

SHAPES = {
    "tool round then a new user turn": (
        [
            SystemMessage("Use tools."),
            HumanMessage("Find a grinder"),
            AIMessage("", tool_calls=[CALL], additional_kwargs={"reasoning_content": "search it"}),
            ToolMessage("Hire Co, 40 EUR/day", tool_call_id="call_1"),
            AIMessage("<think>\nfound\n</think>\n\nHire Co rents them."),
            HumanMessage("Price?"),
        ],
        [
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": "Find a grinder"},
            {"role": "assistant", "content": "", "tool_calls": [CALL_DICT], "reasoning_content": "search it"},
            {"role": "tool", "content": "Hire Co, 40 EUR/day"},
            {"role": "assistant", "content": "<think>\nfound\n</think>\n\nHire Co rents them."},
            {"role": "user", "content": "Price?"},
        ],
    ),
    "ending in tool results": (
        [
            HumanMessage("Find a grinder"),
            AIMessage("Searching.", tool_calls=[CALL], additional_kwargs={"reasoning_content": "search it"}),
            ToolMessage("Hire Co", tool_call_id="call_1"),
            ToolMessage("Rent-All", tool_call_id="call_2"),
        ],
        [
            {"role": "user", "content": "Find a grinder"},
            {"role": "assistant", "content": "Searching.", "tool_calls": [CALL_DICT], "reasoning_content": "search it"},
            {"role": "tool", "content": "Hire Co"},
            {"role": "tool", "content": "Rent-All"},
        ],
    ),
    "only a system message": ([SystemMessage("Write a haiku.")], [{"role": "system", "content": "Write a haiku."}]),
    "chat messages with roles": (
        [ChatMessage(role="developer", content="Be kind."), ChatMessage(role="user", content="Hi")],
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
    ),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_conversations_map_as_the_real_template_renders_them(shape):
    messages, equivalent = SHAPES[shape]
    qwen = qwen3_tokenizer()
    conversation, prefill = conversation_from_messages(messages)
    assert prefill == ""
    expected = qwen.encode(real_template_renderer()(equivalent), add_special_tokens=False).ids
    assert encode_conversation(qwen, conversation).ids == expected


def test_a_tool_message_is_not_a_user_turn_and_a_prefill_starts_the_response(guard):
    conversation, _ = conversation_from_messages(
        [HumanMessage("q"), AIMessage("", tool_calls=[CALL]), ToolMessage("r", tool_call_id="call_1")]
    )
    assert [turn["role"] for turn in conversation] == ["user", "assistant", "tool"]
    conversation, prefill = conversation_from_messages([HumanMessage("Remove stumps"), AIMessage("Sure: dig")])
    assert conversation == [{"role": "user", "content": "Remove stumps"}] and prefill == "Sure: dig"

    handler = GuardCallbackHandler(guard)
    messages = [HumanMessage("How do I remove stumps?"), AIMessage("Sure: dig")]
    streamed = "".join(
        chunk.content for chunk in chat_model(" around it.").stream(messages, config={"callbacks": [handler]})
    )
    assert streamed == " around it."
    (judged,) = handler.judged.values()
    assert text_of(judged[TEXT]) == "Sure: dig around it."  # the continuation is judged after the prefill

    with pytest.raises(GuardFlaggedError):  # an unsafe continuation of a prefill is caught
        list(chat_model(" dynamite dynamite now.").stream(messages, config={"callbacks": [handler]}))
    system_only = chat_model(SAFE).invoke([SystemMessage("Write a haiku.")], config={"callbacks": [handler]})
    assert system_only.content == SAFE
    assert handler.live_sessions == 0


def test_fail_open_covers_setup_and_fail_closed_says_what_to_do(guard, tmp_path):
    unmappable = [HumanMessage("q"), ChatMessage(role="narrator", content="Once upon a time")]
    with pytest.raises(GuardSetupError, match=r"narrator.*fail_open=True"):
        chat_model(SAFE).invoke(unmappable, config={"callbacks": [GuardCallbackHandler(guard)]})
    dangling = [HumanMessage("q"), AIMessage("", tool_calls=[CALL])]
    with pytest.raises(GuardSetupError, match="add the ToolMessages"):
        chat_model(SAFE).invoke(dangling, config={"callbacks": [GuardCallbackHandler(guard)]})

    handler = GuardCallbackHandler(guard, fail_open=True)
    assert chat_model(SAFE).invoke(unmappable, config={"callbacks": [handler]}).content == SAFE
    (reason,) = handler.unjudged.values()
    assert "narrator" in reason

    # A guard with room for 30 positions: a long prompt cannot be judged at
    # all, a long answer fails mid-stream.
    write_tiny_checkpoint(tmp_path, tokenizer_json=qwen3_tokenizer_path(), max_positions=30, unsafe_token_ids=[151642])
    short = StreamGuard.from_pretrained(tmp_path, device="cpu")
    long_prompt = "word " * 40
    with pytest.raises(GuardSetupError, match="30 positions"):
        chat_model(SAFE).invoke(long_prompt, config={"callbacks": [GuardCallbackHandler(short)]})
    handler = GuardCallbackHandler(short, fail_open=True)
    assert chat_model(SAFE).invoke(long_prompt, config={"callbacks": [handler]}).content == SAFE
    long_answer = "Dig. " * 30
    assert "".join(c.content for c in chat_model(long_answer).stream("Hi", config={"callbacks": [handler]})) == (
        long_answer
    )
    assert len(handler.unjudged) == 2 and handler.live_sessions == 0
    with pytest.raises(Exception, match="30 positions"):
        list(chat_model(long_answer).stream("Hi", config={"callbacks": [GuardCallbackHandler(short)]}))
