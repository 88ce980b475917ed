"""The gateway relays only what it judged (issue 18): one regression test per
defect an attacker's review found, driven as the review drove it: an upstream
that writes its bytes itself (``RawUpstream``), ``crossguard serve`` run as a
process with the tiny guard wired Unsafe on " dynamite", and real clients
(the ``openai`` SDK, httpx, raw sockets). Tests that need another setting or
a slowed guard run the same app in this process.

Plus a property test: chunks with random extra fields and the flagged word in
a random string field; no byte of the word (also after undoing JSON escapes)
reaches the client."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapter.bundled_tokenizers import generator_tokenizer
from guard import StreamGuard
from integrations.gateway import GatewayConfig, create_app
from tests.gateway_harness import (
    AppServer,
    CliGateway,
    RawUpstream,
    http_response,
    metric,
    sse_body,
    wait_for,
    write_gateway_guard,
)

WORD = " dynamite"  # what the tiny guards flag (in answers; the command line's also in prompts)
MESSAGES = [{"role": "user", "content": "Tell me something."}]
TOOLS = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama3():
    return generator_tokenizer("llama3")


@pytest.fixture(scope="module")
def raw():
    with RawUpstream() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def cli(raw):
    gateway = CliGateway(raw.url, "--generator", "llama3", "--max-streams", "3", "--send-timeout", "2",
                         "--body-timeout", "2", "--max-tool-calls", "8",
                         environment={"PYTHONUNBUFFERED": "1"})  # fmt: skip
    try:
        yield gateway.wait_ready()
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def guard(tmp_path_factory):
    return StreamGuard.from_pretrained(write_gateway_guard(tmp_path_factory.mktemp("trust-guard")))


@pytest.fixture(scope="module")
def app(guard, llama3, raw):
    """The gateway in this process, with other settings: ``app(**config)``."""
    servers = []

    def start(**options):
        options.setdefault("upstream", raw.url)
        config = GatewayConfig(**options)
        server = AppServer(create_app(config, guard=guard, generator=llama3 if config.generator else None)).start()
        server.gateway = server.app.state.gateway
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


# --- helpers ----------------------------------------------------------------------------


def chunk(delta=None, *, finish=None, ids=None, index=0, choice=None, **top) -> dict:
    entry = {"index": index, "delta": delta if delta is not None else {}, "logprobs": None, "finish_reason": finish}
    if ids is not None:
        entry["token_ids"] = ids
    entry.update(choice or {})
    return {"id": "chatcmpl-raw", "object": "chat.completion.chunk", "created": 1, "model": "raw",
            "choices": [entry], **top}  # fmt: skip


def answer(message, *, finish="stop", choice=None, **top) -> dict:
    entry = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish, **(choice or {})}
    return {"id": "chatcmpl-raw", "object": "chat.completion", "created": 1, "model": "raw", "choices": [entry], **top}


def streamed(*events, line_end="\n", done=True, **options) -> dict:
    """A request body whose upstream answer is these SSE events."""
    role = chunk({"role": "assistant", "content": ""})
    return {"raw": http_response(sse_body([role, *events], line_end=line_end, done=done), **options)}


def whole(data, **options) -> dict:
    """A request body whose upstream answer is this JSON (a non-streamed answer)."""
    options.setdefault("content_type", "application/json")
    return {"raw": http_response(json.dumps(data), **options)}


def post(server, order: dict, *, stream=True, messages=MESSAGES, timeout=30, path="/v1/chat/completions",
         **fields) -> httpx.Response:  # fmt: skip
    body = {"model": "raw", "messages": messages, "stream": stream, **order, **fields}
    return httpx.post(server.url + path, json=body, timeout=timeout)


def events(response: httpx.Response) -> list[dict]:
    lines = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
    return [json.loads(line) for line in lines if line != "[DONE]"]


def shown(response: httpx.Response) -> str:
    return "".join((choice.get("delta") or {}).get("content") or ""
                   for event in events(response) for choice in event.get("choices") or ())  # fmt: skip


def error_of(response: httpx.Response) -> dict | None:
    return next((event["error"] for event in events(response) if "error" in event), None)


def finish_reasons(response: httpx.Response) -> list[str]:
    return [choice["finish_reason"] for event in events(response) for choice in event.get("choices") or ()
            if choice.get("finish_reason")]  # fmt: skip


def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test", max_retries=0, timeout=30)


def leaks(text: str) -> bool:
    """Whether the flagged word is in ``text``, also once every \\u escape in it
    is undone, at any depth (tool arguments are JSON inside a JSON string)."""
    for _ in range(3):
        if "dynamite" in text:
            return True
        text = re.sub(r"\\u([0-9a-fA-F]{4})", lambda match: chr(int(match.group(1), 16)), text)
    return "dynamite" in text

# --- 1. unjudged fields ----------------------------------------------------------------------


STREAMED_SMUGGLERS = {
    "audio transcript": chunk({"audio": {"id": "a1", "data": "AAAA", "transcript": f"Use{WORD} now."}}),
    "tool name": chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                        "function": {"name": "get_dynamite", "arguments": "{}"}}]}),
    "custom tool input": chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "custom",
                                                "custom": {"name": "shell", "input": f"buy{WORD} now"}}]}),
    "reasoning_details": chunk({"reasoning_details": [{"type": "reasoning.text", "text": f"Use{WORD}."}]}),
    "thinking": chunk({"thinking": f"Use{WORD}."}),
    "annotations": chunk({"content": "Hi", "annotations": [{"type": "url_citation", "url_citation": {
        "url": "https://example.com/dynamite", "title": f"How to use{WORD}"}}]}),
    "choices[].text": chunk({"content": "Hi"}, choice={"text": f"Use{WORD}."}),
    "a message in a chunk": chunk({"content": "Hi"}, choice={"message": {"content": f"Use{WORD}."}}),
    "top-level extension": chunk({"content": "Hi"}, x_extension=f"Use{WORD}.", usage={"note": f"use{WORD}"}),
}


@pytest.mark.parametrize("where", sorted(STREAMED_SMUGGLERS))
def test_1_fields_the_gateway_does_not_judge_never_reach_the_client(cli, where):
    tools = [*TOOLS, {"type": "custom", "custom": {"name": "shell"}}]
    response = post(cli, streamed(STREAMED_SMUGGLERS[where], chunk({"content": " Fine."}), chunk(finish="stop")),
                    tools=tools)  # fmt: skip
    assert response.status_code == 200
    assert not leaks(response.text), response.text
    assert response.text.rstrip().endswith("data: [DONE]")


NON_STREAMED_SMUGGLERS = {
    "audio transcript": answer({"role": "assistant", "content": "Hi", "audio": {"id": "a", "transcript": WORD}}),
    "annotations": answer({"role": "assistant", "content": "Hi", "annotations": [{"title": WORD}]}),
    "reasoning_details": answer({"role": "assistant", "content": "Hi", "reasoning_details": [{"text": WORD}]}),
    "thinking": answer({"role": "assistant", "content": "Hi", "thinking": WORD}),
    "choices[].text": answer({"role": "assistant", "content": "Hi"}, choice={"text": WORD}),
    "top-level extension": answer({"role": "assistant", "content": "Hi"}, x_extension=WORD),
    "tool name": answer({"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "dynamite", "arguments": "{}"}}]}),
}


@pytest.mark.parametrize("where", sorted(NON_STREAMED_SMUGGLERS))
def test_1_non_streamed_answers_are_rebuilt_too(cli, where):
    response = post(cli, whole(NON_STREAMED_SMUGGLERS[where]), stream=False, tools=TOOLS)
    assert not leaks(response.text), response.text
    assert response.status_code in (200, 502)


def test_1_what_is_judged_still_passes_whole(cli):
    calls = [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "search", "arguments": ""}}]
    args = [{"index": 0, "function": {"arguments": piece}} for piece in ('{"q": ', '"weather', ' in Paris"}')]
    events_in = [chunk({"reasoning": "Think.", "reasoning_content": "Think."}), chunk({"content": "Sure."}),
                 chunk({"tool_calls": calls}), *(chunk({"tool_calls": [a]}) for a in args),
                 chunk(finish="tool_calls", usage={"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12,
                                                   "completion_tokens_details": {"reasoning_tokens": 2}})]  # fmt: skip
    chunks = list(sdk(cli).chat.completions.create(model="raw", messages=MESSAGES, stream=True, tools=TOOLS,
                                                   extra_body=streamed(*events_in)))  # fmt: skip
    text = "".join(c.delta.content or "" for ch in chunks for c in ch.choices)
    calls = [t for ch in chunks for c in ch.choices for t in c.delta.tool_calls or ()]
    arguments = "".join(t.function.arguments or "" for t in calls)
    names = [t.function.name for t in calls if t.function.name]
    assert text == "Sure." and arguments == '{"q": "weather in Paris"}' and names == ["search"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 2


# --- 2. ids and logprobs -------------------------------------------------------------------------


def _logprob(token: str, alternatives=()) -> dict:
    return {"token": token, "logprob": -0.5, "bytes": list(token.encode()),
            "top_logprobs": [{"token": a, "logprob": -2.0, "bytes": list(a.encode())} for a in alternatives]}


def test_2_logprob_alternatives_and_logprobs_that_disagree_never_go_out(cli, llama3):
    ids = llama3.encode("Hello there", add_special_tokens=False).ids
    pieces = [llama3.decode([token]) for token in ids]
    agreeing = [chunk({"content": piece}, ids=[token], choice={"logprobs": {"content": [_logprob(piece, [WORD])]}})
                for token, piece in zip(ids, pieces, strict=True)]  # fmt: skip
    response = post(cli, streamed(*agreeing, chunk(finish="stop", ids=[128009])))
    assert not leaks(response.text) and shown(response) == "Hello there"
    kept = [entry for event in events(response) for choice in event.get("choices") or ()
            for entry in ((choice.get("logprobs") or {}).get("content") or ())]  # fmt: skip
    assert [entry["token"] for entry in kept] == pieces and all(entry["top_logprobs"] == [] for entry in kept)
    disagreeing = chunk({"content": "Hello"}, ids=ids[:1], choice={"logprobs": {"content": [_logprob(WORD)]}})
    response = post(cli, streamed(disagreeing, chunk(finish="stop", ids=[128009])))
    assert not leaks(response.text) and shown(response) == "Hello"


@pytest.mark.parametrize("generator", ["llama3", None])
def test_2_non_streamed_ids_and_logprobs_that_spell_other_text_are_stripped(app, llama3, generator):
    server = app(generator=generator)
    other = llama3.encode(f"Sure, use{WORD} for that.", add_special_tokens=False).ids
    data = answer({"role": "assistant", "content": "Hello there."},
                  choice={"token_ids": other, "logprobs": {"content": [_logprob("Sure,"), _logprob(WORD)]}})
    body = post(server, whole(data), stream=False).json()
    choice = body["choices"][0]
    assert choice["message"]["content"] == "Hello there." and choice["finish_reason"] == "stop"
    assert "token_ids" not in choice and choice["logprobs"] is None
    assert not leaks(json.dumps(body))
    good = llama3.encode("Hello there.", add_special_tokens=False).ids
    data = answer({"role": "assistant", "content": "Hello there."}, choice={"token_ids": good})
    choice = post(server, whole(data), stream=False).json()["choices"][0]
    assert choice.get("token_ids") == (good if generator else None)


# --- 3. upstream error text -----------------------------------------------------------------------


def test_3_upstream_error_text_is_logged_never_echoed(cli):
    mid_stream = streamed(chunk({"content": "Hi"}), {"error": {"message": f"failed: use{WORD} quickly", "code": 500}},
                          done=False)  # fmt: skip
    response = post(cli, mid_stream)
    error = error_of(response)
    assert error["code"] == "upstream_error_event" and error["upstream_status"] == 500 and not leaks(response.text)
    llama_cpp = streamed(chunk({"content": "Hi"}), f'error: {{"message": "parse error at \\"{WORD}\\""}}\n\n',
                         done=False)  # fmt: skip
    response = post(cli, llama_cpp)
    assert error_of(response)["code"] == "upstream_error_event" and not leaks(response.text)
    status = whole({"error": {"message": f"crashed writing{WORD}", "type": "InternalServerError", "code": 500}},
                   status="500 Internal Server Error")  # fmt: skip
    for stream in (True, False):
        response = post(cli, status, stream=stream)
        assert response.status_code == 500 and not leaks(response.text)
        assert response.json()["error"]["type"] == "InternalServerError"
    response = post(cli, {"raw": http_response(f"use{WORD}", status="400 Bad Request", content_type="text/plain")})
    assert response.status_code == 400 and not leaks(response.text)
    assert wait_for(lambda: "crashed writing" in cli.output())  # the log keeps it


# --- 4. --no-tool-calls exempts tool calls only ---------------------------------------------------


def test_4_no_tool_calls_still_judges_refusals(app):
    server = app(judge_tool_calls=False)
    response = post(server, streamed(chunk({"refusal": f"I won't explain{WORD} here."}), chunk(finish="stop")))
    assert not leaks(response.text) and finish_reasons(response) == ["content_filter"]
    data = answer({"role": "assistant", "content": None, "refusal": f"No{WORD} talk."})
    body = post(server, whole(data), stream=False).json()
    assert not leaks(json.dumps(body)) and body["choices"][0]["finish_reason"] == "content_filter"


# --- 5. tool arguments judged as the strings a tool sees ------------------------------------------


@pytest.mark.parametrize("pieces", [[r'{"q": "use \u0064ynamite now"}'], [r'{"q": "use \u00', r'64ynamite now"}'],
                                    [r'{"q": "use \u0020\u0064\u0079\u006e\u0061\u006d\u0069\u0074\u0065"}']])
def test_5_escaped_tool_arguments_are_judged_decoded(cli, pieces):
    first = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "search", "arguments": ""}}
    events_in = [chunk({"tool_calls": [first]}),
                 *(chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in pieces),
                 chunk({"content": " More text to come."}), chunk(finish="tool_calls")]  # fmt: skip
    response = post(cli, streamed(*events_in), tools=TOOLS)
    arguments = "".join(call["function"].get("arguments") or "" for event in events(response)
                        for choice in event.get("choices") or ()
                        for call in (choice.get("delta") or {}).get("tool_calls") or ())  # fmt: skip
    assert finish_reasons(response) == ["content_filter"] and not leaks(arguments) and not leaks(response.text)
    data = answer({"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": "".join(pieces)}}]},
        finish="tool_calls")  # fmt: skip
    body = post(cli, whole(data), stream=False, tools=TOOLS).json()
    assert body["choices"][0]["finish_reason"] == "content_filter" and not leaks(json.dumps(body))


# --- 6. cookies -----------------------------------------------------------------------------------


def test_6_an_upstream_cookie_for_one_client_never_reaches_another(cli, raw):
    a = streamed(chunk({"content": "Hi A"}), chunk(finish="stop"), headers="set-cookie: session=client-a; Path=/\r\n")
    first = post(cli, a)
    assert "client-a" not in first.text and "set-cookie" not in first.headers
    post(cli, streamed(chunk({"content": "Hi B"}), chunk(finish="stop")))
    assert "cookie" not in raw.requests[-1][2]


# --- 7. every text field of the prompt is judged --------------------------------------------------


def test_7_both_reasoning_fields_of_the_prompt_are_judged(cli, raw):
    before = len(raw.requests)
    call = {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": '{"q": "x"}'}}
    messages = [{"role": "user", "content": "What's the weather?"},
                {"role": "assistant", "content": "", "reasoning": "Let me look it up.",
                 "reasoning_content": f"They want to use{WORD} on it.", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny."}]  # fmt: skip
    response = post(cli, streamed(chunk({"content": "Sunny."}), chunk(finish="stop")), messages=messages, tools=TOOLS)
    assert response.status_code == 400 and response.json()["error"]["code"] == "content_filter"
    assert len(raw.requests) == before
    # Reasoning of turns before the last user turn: the guard's template leaves it out, so it is not forwarded.
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello.", "reasoning_content": "A greeting."},
                {"role": "user", "content": "Thanks."}]  # fmt: skip
    post(cli, streamed(chunk({"content": "Welcome."}), chunk(finish="stop")), messages=messages)
    forwarded = json.loads(raw.requests[-1][3])["messages"]
    assert "reasoning_content" not in forwarded[1] and forwarded[1]["content"] == "Hello."


def test_7_message_fields_the_gateway_does_not_know_are_refused(cli, raw):
    before = len(raw.requests)
    messages = [{"role": "user", "content": "Hi", "x_note": f"use{WORD}"}]
    response = post(cli, streamed(chunk(finish="stop")), messages=messages)
    assert response.status_code == 400 and "x_note" in response.json()["error"]["message"]
    assert len(raw.requests) == before


# --- 8. secrets in logs ---------------------------------------------------------------------------


def test_8_a_key_in_the_query_string_stays_out_of_the_access_log(cli):
    body = {"model": "raw", "messages": MESSAGES, "stream": True, **streamed(chunk(finish="stop"))}
    httpx.post(cli.url + "/v1/chat/completions?api-key=query-secret-123", json=body, timeout=30)
    assert wait_for(lambda: "POST /v1/chat/completions?" in cli.output()), cli.output()[-2000:]
    assert "query-secret-123" not in cli.output()


# --- 9. clients that stop reading -----------------------------------------------------------------


def _stalled_client(url: str, body: dict) -> socket.socket:
    """A client that sends its request and never reads (its receive buffer kept tiny)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: " + str(len(data)).encode() + b"\r\n\r\n" + data)  # fmt: skip
    return sock


def test_9_clients_that_stop_reading_are_dropped_and_free_their_slots(cli, raw):
    # Chunks that carry no text: nothing waits for the guard, so each goes out at once.
    empty = "data: " + json.dumps(chunk({"content": ""})) + "\n\n"
    order = {"raw": http_response(""), "forever": empty}
    before = len(raw.connections)
    body = {"model": "raw", "messages": MESSAGES, "stream": True, **order}
    stalled = [_stalled_client(cli.url, body) for _ in range(3)]
    try:
        assert wait_for(lambda: len(raw.connections) >= before + 3)
        refused = post(cli, streamed(chunk({"content": "Hi"}), chunk(finish="stop")))
        assert refused.status_code == 429  # three stalled clients hold the three slots...
        assert wait_for(lambda: metric(cli, "crossguard_streams_open") == 0, timeout=20)  # ...until dropped
        assert all(raw.wait_closed(number) for number in range(before, before + 3))
        served = post(cli, streamed(chunk({"content": "Hi"}), chunk(finish="stop")))
        assert served.status_code == 200 and shown(served) == "Hi"
    finally:
        for sock in stalled:
            sock.close()


# --- 10. time limits and disconnects while the guard works ----------------------------------------


@pytest.fixture
def slowed(app):
    """A gateway whose guard takes 0.2 s per engine step (a long prompt takes many)."""
    server = app(request_timeout_s=1.0)
    engine = server.gateway.engine
    forward = engine._forward

    def slow(*args, **kwargs):
        time.sleep(0.2)
        return forward(*args, **kwargs)

    engine._forward = slow
    yield server
    engine._forward = forward


def _steps_settle(engine) -> int:
    """Engine steps once they stop changing (the guard has stopped working)."""
    last = -1
    while engine.steps != last:
        last = engine.steps
        time.sleep(0.6)
    return last


def test_10_prompt_judging_obeys_the_time_limit_and_stops_the_guard(slowed, raw):
    before = len(raw.requests)
    long_prompt = [{"role": "user", "content": "Tell me about trees. " * 700}]  # ~3,500 guard tokens: 14 steps
    started = time.monotonic()
    response = post(slowed, streamed(chunk(finish="stop")), messages=long_prompt)
    assert response.status_code == 504 and time.monotonic() - started < 2.5
    engine = slowed.gateway.engine
    settled = _steps_settle(engine)
    time.sleep(0.5)
    assert engine.steps == settled and len(raw.requests) == before


def test_10_a_client_that_leaves_stops_the_guard_on_its_prompt(app, raw):
    server = app()
    engine = server.gateway.engine
    forward = engine._forward
    engine._forward = lambda *a, **k: (time.sleep(0.2), forward(*a, **k))[1]
    try:
        steps = engine.steps
        with pytest.raises(httpx.TimeoutException):
            post(server, streamed(chunk(finish="stop")), messages=[{"role": "user", "content": "Trees. " * 1500}],
                 timeout=0.6)  # fmt: skip
        settled = _steps_settle(engine)
        assert settled - steps < 10  # the whole prompt would take about 12 steps
        assert wait_for(lambda: metric(server, "crossguard_guard_sessions") == 0)
    finally:
        engine._forward = forward


def test_10_non_streamed_judging_obeys_the_time_limit(slowed):
    data = answer({"role": "assistant", "content": "Trees grow slowly. " * 600})
    started = time.monotonic()
    response = post(slowed, whole(data), stream=False)
    assert response.status_code == 504 and time.monotonic() - started < 2.5
    _steps_settle(slowed.gateway.engine)


# --- 11. what a stream holds back is bounded ------------------------------------------------------


def test_11_text_less_chunks_behind_held_back_text_cannot_pile_up(cli, raw):
    # "Sure" is held back (the guard's tokenizer waits for what follows); empty chunks then arrive without end.
    order = {"raw": http_response("data: " + json.dumps(chunk({"role": "assistant", "content": "Sure"})) + "\n\n"),
             "forever": "data: " + json.dumps(chunk({})) + "\n\n"}  # fmt: skip
    started = time.monotonic()
    response = post(cli, order)
    error = error_of(response)
    assert error is not None and "1,024 chunks" in error["message"] and time.monotonic() - started < 10
    assert response.text.rstrip().endswith("data: [DONE]")
    assert raw.wait_closed(-1)


# --- 12. one request cannot take the whole guard --------------------------------------------------


def _tool_calls_answer(count: int) -> dict:
    calls = [{"id": f"call_{n}", "type": "function",
              "function": {"name": "search", "arguments": f'{{"q": "city {n}"}}'}} for n in range(count)]  # fmt: skip
    return answer({"role": "assistant", "content": None, "tool_calls": calls}, finish="tool_calls")


def test_12_parallel_tool_calls_share_the_judged_prompt(app):
    server = app(max_tool_calls=128)
    engine = server.gateway.engine
    prompt = [{"role": "user", "content": "Weather please, " * 500}]  # about 2,000 guard tokens
    tokens = engine.tokens
    body = post(server, whole(_tool_calls_answer(100)), stream=False, messages=prompt, tools=TOOLS).json()
    assert len(body["choices"][0]["message"]["tool_calls"]) == 100
    judged = engine.tokens - tokens
    # The prompt once, plus each call's arguments and end of turn (before: the prompt again for every call).
    assert judged < 2_000 + 100 * 40, judged


def test_12_a_request_cannot_take_sessions_another_reserved(app):
    server = app(max_streams=2, max_tool_calls=64)  # the engine holds 16 guard sessions
    assert server.gateway.engine.max_sessions == 16
    first = {"index": 0, "function": {"arguments": ""}}
    calls = [chunk({"tool_calls": [{**first, "index": n, "id": f"call_{n}", "type": "function",
                                    "function": {"name": "search", "arguments": f'{{"q": "city {n}"}}'}}]})
             for n in range(24)]  # fmt: skip
    order = {"raw_parts": [http_response(""), *(sse_body([c], done=False) for c in calls)], "pace_ms": 60, "hold": True}
    greedy: dict = {}

    def run_greedy():
        greedy["response"] = post(server, order, tools=TOOLS)

    thread = threading.Thread(target=run_greedy)
    thread.start()
    time.sleep(0.5)  # the greedy answer has opened a few streams
    other = post(server, streamed(chunk({"content": "Hello."}), chunk(finish="stop")))
    assert other.status_code == 200 and shown(other) == "Hello."
    thread.join(30)
    response = greedy["response"]
    assert error_of(response)["code"] == "guard_capacity" and not leaks(response.text)


def test_12_tool_calls_per_answer_are_bounded(cli):
    response = post(cli, whole(_tool_calls_answer(9)), stream=False, tools=TOOLS)
    assert response.status_code == 502 and "8 tool calls" in response.json()["error"]["message"]
    call = {"type": "function", "function": {"name": "search", "arguments": "{}"}}
    calls = [chunk({"tool_calls": [{"index": n, "id": f"c{n}", **call}]}) for n in range(9)]
    response = post(cli, streamed(*calls, chunk(finish="tool_calls")), tools=TOOLS)
    assert error_of(response)["code"] == "too_many_tool_calls"


# --- 13. a body that never ends -------------------------------------------------------------------


def test_13_a_partial_body_then_silence_is_counted_and_answered_408(cli):
    host, port = cli.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 200\r\n\r\n{\"model\": \"raw\"")  # fmt: skip
        assert wait_for(lambda: metric(cli, "crossguard_streams_open") == 1, timeout=1.5)
        sock.settimeout(10)
        started = time.monotonic()
        answer_bytes = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            while chunk_ := sock.recv(65536):
                answer_bytes += chunk_
        assert answer_bytes.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 4
    assert wait_for(lambda: metric(cli, "crossguard_streams_open") == 0)


# --- 14. content null -----------------------------------------------------------------------------


def test_14_tool_call_and_refusal_answers_with_null_content(cli):
    call = {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": '{"q": "Paris"}'}}
    data = answer({"role": "assistant", "content": None, "tool_calls": [call]}, finish="tool_calls")
    completion = sdk(cli).chat.completions.create(model="raw", messages=MESSAGES, tools=TOOLS, extra_body=whole(data))
    message = completion.choices[0].message
    assert message.content is None and message.tool_calls[0].function.arguments == '{"q": "Paris"}'
    assert completion.choices[0].finish_reason == "tool_calls"
    data = answer({"role": "assistant", "content": None, "refusal": "I can't help with that."})
    completion = sdk(cli).chat.completions.create(model="raw", messages=MESSAGES, extra_body=whole(data))
    assert completion.choices[0].message.refusal == "I can't help with that."


# --- 15. NaN and Infinity -------------------------------------------------------------------------


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_15_nan_and_infinity_get_the_openai_400(cli, constant):
    body = b'{"model": "raw", "messages": [{"role": "user", "content": "hi"}], "temperature": %s}' % constant.encode()
    response = httpx.post(cli.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    assert constant.lstrip("-") in response.json()["error"]["message"]


# --- 16. a lone surrogate -------------------------------------------------------------------------


def test_16_a_lone_surrogate_in_a_delta_ends_the_stream_cleanly(cli):
    lone = '{"id":"x","object":"chat.completion.chunk","created":1,"model":"raw","choices":[{"index":0,' \
           '"delta":{"content":"ok \\ud800 fine"},"finish_reason":null}]}'  # fmt: skip
    response = post(cli, streamed(f"data: {lone}\n\n", chunk(finish="stop")))
    assert response.text.rstrip().endswith("data: [DONE]") and shown(response) == "ok \ufffd fine"
    chunks = list(sdk(cli).chat.completions.create(model="raw", messages=MESSAGES, stream=True,
                                                   extra_body=streamed(f"data: {lone}\n\n", chunk(finish="stop"))))
    assert "".join(c.delta.content or "" for ch in chunks for c in ch.choices) == "ok \ufffd fine"


# --- 17. what is and is not an event stream -------------------------------------------------------


def test_17_json_answered_to_a_streaming_request_is_refused_clearly(cli):
    data = answer({"role": "assistant", "content": "Hello."})
    with pytest.raises(openai.APIStatusError) as refused:
        list(sdk(cli).chat.completions.create(model="raw", messages=MESSAGES, stream=True, extra_body=whole(data)))
    assert refused.value.status_code == 502 and "event stream" in refused.value.message


@pytest.mark.parametrize("variant", ["capitals", "cr", "crlf", "multi-line data"])
def test_17_event_streams_are_parsed_as_the_spec_says(cli, variant):
    events_in = [chunk({"content": "Hello"}), chunk({"content": " there."}), chunk(finish="stop")]
    if variant == "capitals":
        order = streamed(*events_in, content_type="Text/Event-Stream; Charset=UTF-8")
    elif variant in ("cr", "crlf"):
        order = streamed(*events_in, line_end="\r" if variant == "cr" else "\r\n")
    else:  # one event's JSON over several data: lines, joined with "\n" (whitespace to JSON)
        split = ["data: " + json.dumps(event, indent=1).replace("\n", "\ndata: ") + "\n\n" for event in events_in]
        order = streamed(*split)
    chunks = list(sdk(cli).chat.completions.create(model="raw", messages=MESSAGES, stream=True, extra_body=order))
    assert "".join(c.delta.content or "" for ch in chunks for c in ch.choices) == "Hello there."
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_17_an_error_event_ends_the_stream_as_an_error(cli):
    order = streamed(chunk({"content": "Hi"}), 'event: error\ndata: {"message": "overloaded"}\n\n', done=False)
    with pytest.raises(openai.APIError):
        list(sdk(cli).chat.completions.create(model="raw", messages=MESSAGES, stream=True, extra_body=order))


# --- the property ---------------------------------------------------------------------------------

_names = st.text(st.characters(codec="ascii", categories=("Ll", "Nd")), min_size=1, max_size=8)
_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_names, inner, max_size=3), max_leaves=6,
)  # fmt: skip


def _shapes(n: int) -> list[dict]:
    """Chunks of the kinds servers send (text, reasoning, refusal, a tool call, logprobs, usage)."""
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "search", "arguments": '{"q": "x"}'}}
    return [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": f"Part {n} of the answer."}),
        chunk({"reasoning": "Thinking it over.", "reasoning_content": "Thinking it over."}),
        chunk({"refusal": "Not that."}),
        chunk({"tool_calls": [call]}),
        chunk({"content": "Word"}, choice={"logprobs": {"content": [_logprob("Word", [" other"])]}}),
        chunk(finish="stop", usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}),
    ]


def _string_paths(value, path=()):
    if isinstance(value, str):
        yield path
    elif isinstance(value, dict):
        for name, item in value.items():
            yield from _string_paths(item, (*path, name))
    elif isinstance(value, list):
        for number, item in enumerate(value):
            yield from _string_paths(item, (*path, number))


def _put(value, path, text):
    for step in path[:-1]:
        value = value[step]
    value[path[-1]] = text


@st.composite
def _answers(draw):
    shapes = _shapes(draw(st.integers(0, 9)))
    chunks = [json.loads(json.dumps(shapes[i])) for i in draw(st.lists(st.integers(0, len(shapes) - 1),
                                                                      min_size=1, max_size=5))]  # fmt: skip
    for item in chunks:  # random extra fields, anywhere
        for target in draw(st.lists(st.sampled_from(["top", "choice", "delta"]), max_size=3)):
            where = {"top": item, "choice": item["choices"][0], "delta": item["choices"][0]["delta"]}[target]
            where[draw(_names)] = draw(_values)
    paths = [(n, path) for n, item in enumerate(chunks) for path in _string_paths(item)]
    number, path = draw(st.sampled_from(paths))
    original = chunks[number]
    for step in path[:-1]:
        original = original[step]
    before = original[path[-1]]
    # Where a word can stand (not glued to the letters after it, which would make another word).
    cuts = [cut for cut in range(len(before) + 1) if cut == len(before) or before[cut] in " .,;:!?\"'{}[]"]
    cut = draw(st.sampled_from(cuts))
    _put(chunks[number], path, before[:cut] + WORD + before[cut:])
    escapes = ["none", "json", "arguments"] if path[-1] == "arguments" else ["none", "json"]
    return chunks, draw(st.sampled_from(escapes))


def _event(item: dict, escape: str) -> str:
    text = json.dumps(item, ensure_ascii=escape != "none")
    if escape == "json":  # every letter of the word as a \u escape in the JSON text
        text = text.replace("dynamite", "".join(f"\\u{ord(c):04x}" for c in "dynamite"))
    elif escape == "arguments":  # escaped inside the JSON text of tool arguments, itself a JSON string
        text = text.replace("dynamite", "".join(f"\\\\u{ord(c):04x}" for c in "dynamite"))
    return f"data: {text}\n\n"


@pytest.fixture(scope="module")
def property_gateway(app):
    return app(generator="llama3")


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_answers())
def test_property_no_byte_of_a_flagged_word_reaches_the_client(property_gateway, answer_and_escape):
    chunks, escape = answer_and_escape
    order = {"raw": http_response("".join(_event(item, escape) for item in chunks) + "data: [DONE]\n\n")}
    response = post(property_gateway, order, tools=TOOLS)
    assert not leaks(response.text), response.text
    for event in events(response):
        for path in _string_paths(event):
            value = event
            for step in path:
                value = value[step]
            assert not leaks(value), (path, value)


def test_the_leak_check_sees_every_escape():
    assert leaks('{"a": "\\u0064ynamite"}') and leaks('{"arguments": "{\\"q\\": \\"\\\\u0064ynamite\\"}"}')
    assert not leaks("dyna mite")
