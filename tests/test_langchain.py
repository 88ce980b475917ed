"""The LangChain handler against langchain-core's own fake chat models, sync and async."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel, GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, ChatMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda
from langchain_core.utils.function_calling import convert_to_openai_tool

from adapter.bundled_tokenizers import qwen3_tokenizer, qwen3_tokenizer_path
from adapter.retokenize import encode_ordinary
from guard import SessionClosedError, StreamGuard
from guard.template import encode_conversation
from guard.testing import write_tiny_checkpoint
from integrations.langchain import (
    AsyncGuardCallbackHandler,
    GuardCallbackHandler,
    GuardedChatModel,
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
        return self._track(self.guard.session(policy))

    def _track(self, session):
        """Record the session, and the forks made from it (a request's later guard streams)."""
        self.sessions.append(session)
        fork = session.fork
        session.fork = lambda: self._track(fork())
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

    def close_all_at(self, chunk_number: int):
        """For a scripted model's ``on_chunk``: make the guard fail for real
        mid-stream, by closing every session it opened before that chunk."""

        def close(number: int) -> None:
            if number == chunk_number:
                for session in self.sessions:
                    session.close()

        return close


class ClosedSessions(SessionLedger):
    """The real guard, whose sessions come closed: it cannot judge any prompt."""

    def session(self, policy=None):
        session = super().session(policy)
        session.close()
        return session


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
    on_chunk: Any = None  # called with each chunk's number before it is yielded

    def _stream(self, messages, stop=None, run_manager=None, **kwargs):
        for number, message in enumerate(self.chunks):
            if self.on_chunk is not None:
                self.on_chunk(number)
            chunk = ChatGenerationChunk(message=message)
            if run_manager:
                run_manager.on_llm_new_token(message.content, chunk=chunk)
            yield chunk


def scripted(chunks, on_chunk=None) -> ScriptedChunksChatModel:
    return ScriptedChunksChatModel(messages=iter([]), chunks=chunks, on_chunk=on_chunk)


def scripted_text(text: str, on_chunk=None) -> ScriptedChunksChatModel:
    """The text streamed in chunks split at whitespace, as GenericFakeChatModel does."""
    return scripted([AIMessageChunk(content=part) for part in re.split(r"(\s)", text) if part], on_chunk)


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
    handler = GuardCallbackHandler(guard, keep_results=1)
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

    calm = GuardCallbackHandler(guard, keep_results=1)
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


def interleaved_tool_call_chunks() -> list[AIMessageChunk]:
    """Some text, then two tool calls whose argument chunks interleave."""
    return [
        AIMessageChunk(content="Looking", tool_call_chunks=[]),
        AIMessageChunk(content="", tool_call_chunks=[{"name": "search", "args": "", "id": "a", "index": 0}]),
        AIMessageChunk(content="", tool_call_chunks=[{"args": '{"query": "rent a', "index": 0}]),
        AIMessageChunk(
            content="", tool_call_chunks=[{"name": "notes", "args": '{"text": "stumps', "id": "b", "index": 1}]
        ),
        AIMessageChunk(content="", tool_call_chunks=[{"args": ' grinder"}', "index": 0}]),
        AIMessageChunk(content="", tool_call_chunks=[{"args": ' and roots"}', "index": 1}]),
    ]


def test_interleaved_tool_call_chunks_are_one_stream_per_call_in_the_order_generated(guard):
    chunks = interleaved_tool_call_chunks()
    handler = GuardCallbackHandler(guard, keep_results=1)
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

    handler = GuardCallbackHandler(guard, keep_results=1)
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


def test_fail_open_covers_setup_and_fail_closed_says_what_to_do(guard):
    unmappable = [HumanMessage("q"), ChatMessage(role="narrator", content="Once upon a time")]
    with pytest.raises(GuardSetupError, match=r"narrator.*fail_open=True"):
        chat_model(SAFE).invoke(unmappable, config={"callbacks": [GuardCallbackHandler(guard)]})
    dangling = [HumanMessage("q"), AIMessage("", tool_calls=[CALL])]
    with pytest.raises(GuardSetupError, match="add the ToolMessages"):
        chat_model(SAFE).invoke(dangling, config={"callbacks": [GuardCallbackHandler(guard)]})

    handler = GuardCallbackHandler(guard, fail_open=True, keep_results=5)
    assert chat_model(SAFE).invoke(unmappable, config={"callbacks": [handler]}).content == SAFE
    (reason,) = handler.unjudged.values()
    assert "narrator" in reason

    # A guard that cannot judge the prompt at all, and one that fails mid-stream.
    with pytest.raises(GuardSetupError, match="session was closed"):
        chat_model(SAFE).invoke("Hi", config={"callbacks": [GuardCallbackHandler(ClosedSessions(guard))]})
    handler = GuardCallbackHandler(ClosedSessions(guard), fail_open=True, keep_results=5)
    assert chat_model(SAFE).invoke("Hi", config={"callbacks": [handler]}).content == SAFE
    long_answer = "Dig. " * 30
    ledger = SessionLedger(guard)
    failing = scripted_text(long_answer, on_chunk=ledger.close_all_at(10))
    mid_stream = GuardCallbackHandler(ledger, fail_open=True, keep_results=5)
    assert "".join(c.content for c in failing.stream("Hi", config={"callbacks": [mid_stream]})) == long_answer
    assert len(handler.unjudged) == 1 and len(mid_stream.unjudged) == 1
    assert handler.live_sessions == mid_stream.live_sessions == 0
    failing = scripted_text(long_answer, on_chunk=ledger.close_all_at(10))
    with pytest.raises(SessionClosedError, match="session was closed"):
        list(failing.stream("Hi", config={"callbacks": [GuardCallbackHandler(ledger)]}))


# --- GuardedChatModel: the path that withholds -------------------------------------------------

SHOWN = ANSWER[: ANSWER.index(" dynamite")]  # what may be shown: everything before the flagged word
UNSAFE_CHARACTER = "\u5c4c"  # 屌: Qwen splits " 屌" into two byte-level tokens


@pytest.fixture(scope="module")
def byte_guard(tmp_path_factory):
    """tests/test_trust.py's byte_guard: both byte tokens of " 屌" Unsafe, so
    the official debounce flags at the second, which completes the character."""
    unsafe = encode_ordinary(qwen3_tokenizer(), " " + UNSAFE_CHARACTER)
    assert len(unsafe) == 2
    folder = write_tiny_checkpoint(
        tmp_path_factory.mktemp("byte-guard"), tokenizer_json=qwen3_tokenizer_path(), unsafe_token_ids=unsafe
    )
    return StreamGuard.from_pretrained(folder, device="cpu")


PROMPT = ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{question}")])


def consume(ways: str, runnable, question="How do I remove stumps?") -> tuple[str, BaseException | None]:
    """What a user of ``runnable`` receives, the way they call it, and the
    error that ends it (if any). Async ways run in a fresh event loop."""
    received: list[str] = []
    value = {"question": question} if not isinstance(runnable, GuardedChatModel) else question

    def text(output) -> str:
        return output if isinstance(output, str) else output.content

    async def asynchronous():
        if ways == "astream":
            async for output in runnable.astream(value):
                received.append(text(output))
        else:
            received.append(text(await runnable.ainvoke(value)))

    try:
        if ways == "stream":
            for output in runnable.stream(value):
                received.append(text(output))
        elif ways == "invoke":
            received.append(text(runnable.invoke(value)))
        elif ways == "batch":
            (output,) = runnable.batch([value])
            received.append(text(output))
        else:
            asyncio.run(asynchronous())
    except Exception as error:
        return "".join(received), error
    return "".join(received), None


WAYS = ["stream", "astream", "invoke", "ainvoke", "batch"]


@pytest.mark.parametrize("chain", [False, True], ids=["model", "LCEL chain"])
@pytest.mark.parametrize("ways", WAYS)
def test_the_wrapper_never_shows_flagged_text(guard, ways, chain):
    ledger = SessionLedger(guard)
    guarded = GuardedChatModel(chat_model(ANSWER), ledger)
    runnable = PROMPT | guarded | StrOutputParser() if chain else guarded
    shown, error = consume(ways, runnable)
    assert isinstance(error, GuardFlaggedError), error
    assert "dynamite" not in shown
    assert shown == (SHOWN if ways in ("stream", "astream") else "")  # the clean text before the flag streams
    assert error.verdict.risk_level == "Unsafe" and error.verdict.position == error.verdict.flagged_at
    assert error.text == " dynamite" and "at ' dynamite': Unsafe (Violent)" in str(error)
    assert error.stream == TEXT and ledger.sessions and ledger.all_closed()


@pytest.mark.parametrize("ways", WAYS)
def test_the_wrapper_ends_with_the_refusal_when_asked(guard, ways):
    runnable = PROMPT | GuardedChatModel(chat_model(ANSWER), guard, refusal="[withheld]") | StrOutputParser()
    shown, error = consume(ways, runnable)
    assert error is None
    assert shown == (SHOWN + "[withheld]" if ways in ("stream", "astream") else "[withheld]")


@pytest.mark.parametrize("ways", WAYS)
def test_the_wrapper_passes_a_safe_answer_as_the_model_gave_it(guard, ways):
    expected = [chunk.content for chunk in chat_model(SAFE).stream("How?")]
    guarded = GuardedChatModel(chat_model(SAFE), guard)
    if ways == "stream":
        assert [chunk.content for chunk in guarded.stream("How?")] == expected  # chunk for chunk
    shown, error = consume(ways, PROMPT | GuardedChatModel(chat_model(SAFE), guard) | StrOutputParser())
    assert error is None and shown == SAFE


@pytest.mark.parametrize("ways", ["stream", "astream", "invoke"])
def test_the_wrapper_withholds_a_character_split_into_several_guard_tokens(byte_guard, ways):
    answer = "ok " + UNSAFE_CHARACTER + " and more"
    shown, error = consume(ways, GuardedChatModel(chat_model(answer), byte_guard), question="Say it.")
    assert isinstance(error, GuardFlaggedError)
    assert UNSAFE_CHARACTER not in shown and "more" not in shown
    assert shown == ("ok" if ways != "invoke" else "")
    # Split inside the character's UTF-16 surrogates or not, a delta at a time.
    chunks = [AIMessageChunk(content=part) for part in ["ok", " ", UNSAFE_CHARACTER, " and", " more"]]
    received = []
    with pytest.raises(GuardFlaggedError):
        for chunk in GuardedChatModel(scripted(chunks), byte_guard).stream("Say it."):
            received.append(chunk.content)
    assert "".join(received) == "ok"


def test_an_isolated_unsafe_token_is_held_then_released(guard):
    # The word " dynam" alone is one Unsafe token, which never flags: held
    # until " now" is judged Safe, then the whole answer comes out.
    assert len(encode_ordinary(qwen3_tokenizer(), " dynam")) == 1
    chunks = [AIMessageChunk(content=part) for part in ["Use", " dyn", "am", " now", " please."]]
    assert "".join(chunk.content for chunk in GuardedChatModel(scripted(chunks), guard).stream("How?")) == (
        "Use dynam now please."
    )


def test_the_wrapper_judges_tool_call_arguments(guard):
    chunks = interleaved_tool_call_chunks()
    message = None
    for chunk in GuardedChatModel(scripted(chunks), guard).stream("Plan"):
        message = chunk if message is None else message + chunk
    assert message.content == "Looking"
    assert [(call["name"], call["args"]) for call in message.tool_calls] == [
        ("search", {"query": "rent a grinder"}),
        ("notes", {"text": "stumps and roots"}),
    ]

    chunks[-1] = AIMessageChunk(content="", tool_call_chunks=[{"args": ' and dynamite dynamite"}', "index": 1}])
    received = []
    with pytest.raises(GuardFlaggedError) as raised:
        for chunk in GuardedChatModel(scripted(chunks), guard).stream("Plan"):
            received.append(chunk)
    assert raised.value.stream == StreamKey(0, 1)
    assert not any("dynamite" in (call.get("args") or "") for chunk in received for call in chunk.tool_call_chunks)

    call = {"name": "search", "args": json.loads(UNSAFE_ARGUMENTS), "id": "call_1"}
    flagged_call = FakeMessagesListChatModel(responses=[AIMessage(content="", tool_calls=[call])])
    with pytest.raises(GuardFlaggedError) as raised:
        GuardedChatModel(flagged_call, guard).invoke("Remove my stumps")
    assert raised.value.stream == StreamKey(0, 0)
    exempt = FakeMessagesListChatModel(responses=[AIMessage(content="", tool_calls=[call])])
    assert (
        GuardedChatModel(exempt, guard, judge_tool_calls=False).invoke("Remove my stumps").tool_calls[0]["args"]
        == (call["args"])
    )


class ToolBindingChatModel(GenericFakeChatModel):
    """GenericFakeChatModel that accepts tools as real chat models do: bound as a RunnableBinding."""

    def bind_tools(self, tools, **kwargs):
        return self.bind(tools=[convert_to_openai_tool(tool) for tool in tools], **kwargs)


def test_bind_tools_keeps_the_guard(guard):
    def search(query: str) -> str:
        """Search the web."""
        return query

    model = ToolBindingChatModel(messages=iter([AIMessage(ANSWER)]))
    guarded = GuardedChatModel(model, guard).bind_tools([search])
    assert isinstance(guarded, GuardedChatModel)
    assert guarded.chat_model.kwargs["tools"][0]["function"]["name"] == "search"
    shown, error = consume("stream", guarded)
    assert isinstance(error, GuardFlaggedError) and shown == SHOWN


def test_a_refused_prompt_carries_the_query_verdict_and_the_model_never_runs(guard):
    model = chat_model(SAFE)
    guarded = GuardedChatModel(model, guard, block_unsafe_prompts=True)
    for ways in ["stream", "invoke", "ainvoke"]:
        shown, error = consume(ways, guarded, question="How do I remove stumps?")
        assert shown == "" and isinstance(error, GuardFlaggedError)
        assert "judged the prompt Unsafe" in str(error)
        assert error.verdict is not None and error.verdict.risk_level == "Unsafe" and error.stream is None
    assert next(model.messages).content == SAFE  # the wrapped model never ran
    refusing = GuardedChatModel(chat_model(SAFE), guard, block_unsafe_prompts=True, refusal="No.")
    answer = refusing.invoke("How do I remove stumps?")
    assert answer.content == "No." and answer.response_metadata["crossguard"]["stream"] == "prompt"
    # The handler's prompt error carries the query verdict too.
    with pytest.raises(GuardFlaggedError) as raised:
        chat_model(SAFE).invoke("Hi", config={"callbacks": [GuardCallbackHandler(guard, block_unsafe_prompts=True)]})
    assert raised.value.verdict.risk_level == "Unsafe" and raised.value.verdict.position is not None


def test_the_callers_callbacks_see_only_judged_text(guard):
    class Recorder(BaseCallbackHandler):
        def __init__(self):
            self.tokens = []

        def on_llm_new_token(self, token, **kwargs):
            self.tokens.append(token)

    recorder = Recorder()
    chain = PROMPT | GuardedChatModel(chat_model(ANSWER), guard) | StrOutputParser()
    with pytest.raises(GuardFlaggedError):
        list(chain.stream({"question": "How?"}, config={"callbacks": [recorder]}))
    assert "".join(recorder.tokens) == SHOWN  # the wrapped model's own tokens never reached the handler

    async def events():
        chain = PROMPT | GuardedChatModel(chat_model(ANSWER), guard, refusal="[withheld]") | StrOutputParser()
        return [event async for event in chain.astream_events({"question": "How?"}, version="v2")]

    streamed = [e["data"]["chunk"].content for e in asyncio.run(events()) if e["event"] == "on_chat_model_stream"]
    assert "".join(streamed) == SHOWN + "[withheld]"


def test_the_wrapper_fails_closed_or_open(guard):
    unmappable = [HumanMessage("q"), ChatMessage(role="narrator", content="Once upon a time")]
    with pytest.raises(GuardSetupError, match=r"narrator.*fail_open=True"):
        GuardedChatModel(chat_model(SAFE), guard).invoke(unmappable)
    assert GuardedChatModel(chat_model(SAFE), guard, fail_open=True).invoke(unmappable).content == SAFE
    long_answer = "Dig. " * 30
    ledger = SessionLedger(guard)
    with pytest.raises(SessionClosedError):
        list(GuardedChatModel(scripted_text(long_answer, on_chunk=ledger.close_all_at(10)), ledger).stream("Hi"))
    failing = scripted_text(long_answer, on_chunk=ledger.close_all_at(10))
    shown = "".join(chunk.content for chunk in GuardedChatModel(failing, ledger, fail_open=True).stream("Hi"))
    assert shown == long_answer and ledger.all_closed()
    with pytest.raises(TypeError, match=r"GuardedChatModel\(chat_model, guard\)"):
        GuardedChatModel(guard, chat_model(SAFE))


# --- the handler: observe and raise, state per run --------------------------------------------


def test_a_non_streamed_run_reports_the_verdict_at_flagged_at(guard):
    model = FakeMessagesListChatModel(responses=[AIMessage(ANSWER)])
    with pytest.raises(GuardFlaggedError) as raised:
        model.invoke("How do I remove stumps?", config={"callbacks": [GuardCallbackHandler(guard)]})
    verdict = raised.value.verdict
    assert verdict.risk_level == "Unsafe" and verdict.category == "Violent"
    assert verdict.position == verdict.flagged_at
    assert "at ' dynamite': Unsafe (Violent)" in str(raised.value)


def test_a_shared_handler_frees_each_run_when_it_ends(guard):
    handler = GuardCallbackHandler(guard)
    for number in range(20):
        chat_model(SAFE).invoke(f"Question {number}", config={"callbacks": [handler]})
    with pytest.raises(GuardFlaggedError):
        list(chat_model(ANSWER).stream("Again", config={"callbacks": [handler]}))
    assert handler.live_runs == 0 and handler.live_sessions == 0
    assert not handler.judged and not handler.unjudged  # nothing is kept unless asked
    # Concurrent runs through one handler are judged apart.
    model = FakeMessagesListChatModel(responses=[AIMessage(SAFE), AIMessage("Rent a stump grinder.")] * 2)
    keeping = GuardCallbackHandler(guard, keep_results=3)
    outputs = model.batch(["a", "b", "c", "d"], config={"callbacks": [keeping], "max_concurrency": 4})
    assert len(outputs) == 4 and keeping.live_runs == 0
    assert len(keeping.judged) == 3
    assert {text_of(judged[TEXT]) for judged in keeping.judged.values()} <= {SAFE, "Rent a stump grinder."}


def test_the_async_handler(guard):
    async def scenario():
        handler = AsyncGuardCallbackHandler(guard, keep_results=2)
        received = []
        with pytest.raises(GuardFlaggedError) as raised:
            async for chunk in chat_model(ANSWER).astream("How?", config={"callbacks": [handler]}):
                received.append(chunk.content)
        assert raised.value.verdict.position == raised.value.verdict.flagged_at
        safe = await chat_model(SAFE).ainvoke("How?", config={"callbacks": [handler]})
        with pytest.raises(GuardFlaggedError):
            await FakeMessagesListChatModel(responses=[AIMessage(ANSWER)]).ainvoke(
                "How?", config={"callbacks": [handler]}
            )
        return handler, "".join(received), safe

    handler, received, safe = asyncio.run(scenario())
    assert isinstance(handler, AsyncCallbackHandler)
    assert "dynamite" in received  # observe and raise: the flagged word came before the flag
    assert safe.content == SAFE and handler.live_sessions == handler.live_runs == 0
    assert len(handler.judged) == 2


def test_the_wrapper_takes_a_runnable_that_gives_whole_messages_or_text(guard):
    whole = RunnableLambda(lambda messages: AIMessage(ANSWER))
    shown, error = consume("stream", GuardedChatModel(whole, guard))
    assert isinstance(error, GuardFlaggedError) and shown == ""
    text = RunnableLambda(lambda messages: SAFE)
    assert GuardedChatModel(text, guard).invoke("How?").content == SAFE
    assert "".join(chunk.content for chunk in GuardedChatModel(text, guard).stream("How?")) == SAFE
    call = {"name": "search", "args": json.loads(UNSAFE_ARGUMENTS), "id": "call_1"}
    with pytest.raises(GuardFlaggedError) as raised:
        list(GuardedChatModel(RunnableLambda(lambda messages: AIMessage("", tool_calls=[call])), guard).stream("Hi"))
    assert raised.value.stream == StreamKey(0, 0)


# --- reasoning is generated text: judged, and withheld when flagged ------------------


class _ReasoningModel(BaseChatModel):
    """A chat model that streams reasoning the ways real backends do."""

    chunks: list
    final: Any = None

    @property
    def _llm_type(self) -> str:
        return "reasoning-test"

    def _generate(self, messages, stop=None, run_manager=None, **kwargs):
        return ChatResult(generations=[ChatGeneration(message=self.final)])

    def _stream(self, messages, stop=None, run_manager=None, **kwargs):
        for chunk in self.chunks:
            yield ChatGenerationChunk(message=chunk)


REASONING_CHUNKS = {
    "reasoning_content": lambda text: AIMessageChunk(content="", additional_kwargs={"reasoning_content": text}),
    "reasoning block": lambda text: AIMessageChunk(content=[{"type": "reasoning", "reasoning": text}]),
    "thinking block": lambda text: AIMessageChunk(content=[{"type": "thinking", "thinking": text}]),
}


@pytest.mark.parametrize("form", sorted(REASONING_CHUNKS))
def test_flagged_reasoning_never_reaches_the_caller(guard, form):
    make = REASONING_CHUNKS[form]
    model = _ReasoningModel(chunks=[make(" use dynamite dynamite"), make(" now"), AIMessageChunk(content=" ok")])
    received = []
    with pytest.raises(GuardFlaggedError):
        for chunk in GuardedChatModel(model, guard).stream("How do I remove stumps?"):
            received.append(chunk)
    assert not any("dynamite" in str(chunk.content) + str(chunk.additional_kwargs) for chunk in received)


@pytest.mark.parametrize("form", sorted(REASONING_CHUNKS))
def test_safe_reasoning_goes_into_the_think_block_and_passes(guard, form):
    make = REASONING_CHUNKS[form]
    model = _ReasoningModel(chunks=[make(" dig around it"), AIMessageChunk(content=" Use a shovel.")])
    chunks = list(GuardedChatModel(model, guard).stream("How do I remove stumps?"))
    assert "".join(_text_of(chunk) for chunk in chunks) == " Use a shovel."
    assert any("dig around it" in str(chunk.content) + str(chunk.additional_kwargs) for chunk in chunks)


def test_reasoning_of_an_invoke_is_judged(guard):
    final = AIMessage(content="ok", additional_kwargs={"reasoning_content": " use dynamite dynamite"})
    with pytest.raises(GuardFlaggedError):
        GuardedChatModel(_ReasoningModel(chunks=[], final=final), guard).invoke("How do I remove stumps?")
    handler = GuardCallbackHandler(guard)
    with pytest.raises(GuardFlaggedError):
        _ReasoningModel(chunks=[], final=final).invoke("How do I remove stumps?", config={"callbacks": [handler]})


def _text_of(chunk) -> str:
    text = chunk.text  # a property in langchain-core 1.x (a str), a method in 0.3
    return text if isinstance(text, str) else text()
