"""The vLLM-like upstream the gateway is tested against: a real HTTP server
streaming what a real tiny Llama 3 generator produces, seen through the real
``openai`` SDK (sync and async) and raw httpx."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from tests.upstream_server import EOT, MODEL_NAME, UpstreamServer

USER = [{"role": "user", "content": "Say something."}]
MULTIBYTE = "Hi 屌 🫠 नमस्ते"


@pytest.fixture(scope="module")
def server():
    with UpstreamServer(api_key="sk-upstream") as upstream:
        yield upstream
    assert not upstream.errors


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.url, api_key="sk-upstream", max_retries=0, timeout=30) as sdk:
        yield sdk


def raw_stream(server, **body) -> list[str]:
    """The SSE ``data:``/comment lines of one streamed request, as sent."""
    body = {"model": MODEL_NAME, "messages": USER, "stream": True, **body}
    headers = {"Authorization": "Bearer sk-upstream"}
    with httpx.stream("POST", f"{server.url}/chat/completions", json=body, headers=headers, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return [line for line in response.iter_lines() if line]


def chunks(lines: list[str]) -> list[dict]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def extra(delta, name: str):
    return getattr(delta, name, None) or (delta.model_extra or {}).get(name)


def test_models_auth_and_request_log(server, client):
    assert [model.id for model in client.models.list()] == [MODEL_NAME]
    listed = httpx.get(f"{server.url}/models", headers={"Authorization": "Bearer sk-upstream"}).json()
    assert listed["object"] == "list" and listed["data"][0]["owned_by"] == "crossguard-tests"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=USER)
    seen = server.requests
    assert seen[0]["method"] == "GET" and seen[0]["path"] == "/v1/models"
    assert seen[0]["headers"]["authorization"] == "Bearer sk-upstream"
    assert seen[-1]["body"]["model"] == "other" and seen[-1]["path"] == "/v1/chat/completions"


def test_streamed_text_equals_non_streamed(server, client):
    script = "The quick brown fox jumps over the lazy dog."
    whole = client.chat.completions.create(model=MODEL_NAME, messages=USER, extra_body={"test_script": script})
    assert whole.choices[0].message.content == script and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens == len(server.encode(script)) + 1  # the script, then <|eot_id|>
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=USER, stream=True, extra_body={"test_script": script}
    )
    parts, finish = [], None
    for chunk in stream:
        parts.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(parts) == script and finish == "stop"
    record = server.completions[-1]
    assert record["stream"] and record["ended"] == "done"
    assert record["choices"][0]["content"] == script
    assert record["choices"][0]["ids"] == [*server.encode(script), EOT]


def test_free_generation_is_real_and_deterministic(server, client):
    """No script: the model itself picks every token (greedy), so the stream
    and the non-streamed answer agree, and max_tokens stops it."""
    whole = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=6)
    lines = raw_stream(server, max_tokens=6, return_token_ids=True)
    got = chunks(lines)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in got)
    ids = [i for c in got for i in c["choices"][0].get("token_ids") or []]
    assert whole.choices[0].finish_reason == "length" and got[-1]["choices"][0]["finish_reason"] == "length"
    assert text == whole.choices[0].message.content == server.decode(ids) and len(ids) == 6
    assert server.completions[-1]["choices"][0]["ids"] == ids


def test_deltas_are_incremental_detokenization_of_token_ids(server):
    lines = raw_stream(server, test_script=MULTIBYTE, return_token_ids=True, stream_options={"include_usage": True})
    assert lines[-1] == "data: [DONE]"
    got = chunks(lines)
    first, body, usage = got[0], got[1:-1], got[-1]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["prompt_token_ids"] == server.completions[-1]["prompt_ids"]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == first["id"] for c in got)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in body)
    ids = [i for c in body for i in c["choices"][0]["token_ids"]]
    assert text == server.decode(ids) == MULTIBYTE
    assert ids == [*server.encode(MULTIBYTE), EOT]
    held = [c for c in body if c["choices"][0]["delta"] == {"content": ""}]
    assert held and all(len(c["choices"][0]["token_ids"]) == 1 for c in held)  # ids come even when text waits
    assert body[-1]["choices"][0] == {
        "index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop", "stop_reason": None, "token_ids": [EOT]
    }  # fmt: skip
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(ids)
    # vLLM's exact shape: the finish reason rides on the EOS token's own chunk.
    merged = chunks(raw_stream(server, test_script="Hello there", test_finish="merged"))
    assert merged[-1]["choices"][0]["finish_reason"] == "stop"
    assert merged[-1]["choices"][0]["delta"] == {"content": ""}
    assert merged[-2]["choices"][0]["finish_reason"] is None


def test_n_choices_each_generate(server, client):
    scripts = ["Alpha one two three.", "Beta four five."]
    got = chunks(raw_stream(server, n=2, test_scripts=scripts, return_token_ids=True))
    assert all(len(c["choices"]) == 1 for c in got)
    order = [c["choices"][0]["index"] for c in got]
    assert order[:4] == [0, 1, 0, 1]  # the role chunks, then interleaved tokens
    for index, script in enumerate(scripts):
        mine = [c["choices"][0] for c in got if c["choices"][0]["index"] == index]
        assert "".join(choice["delta"].get("content", "") for choice in mine) == script
        assert [choice["finish_reason"] for choice in mine if choice["finish_reason"]] == ["stop"]
    whole = client.chat.completions.create(model=MODEL_NAME, messages=USER, n=2, extra_body={"test_script": "Same."})
    assert [choice.message.content for choice in whole.choices] == ["Same.", "Same."]
    assert [choice["content"] for choice in server.completions[-1]["choices"]] == ["Same.", "Same."]


def test_reasoning_and_tool_call_reach_the_sdk(server, client):
    tool = {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}
    body = {"test_reasoning": "The user wants weather.", "test_tool_call": tool}
    stream = client.chat.completions.create(model=MODEL_NAME, messages=USER, stream=True, extra_body=body)
    reasoning, arguments, names, ids, finish = [], [], [], [], None
    for chunk in stream:
        delta = chunk.choices[0].delta
        reasoning.append(extra(delta, "reasoning") or "")
        for call in delta.tool_calls or []:
            ids += [call.id] if call.id else []
            names += [call.function.name] if call.function.name else []
            arguments.append(call.function.arguments or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(reasoning) == "The user wants weather."
    assert names == ["get_weather"] and len(ids) == 1 and finish == "tool_calls"
    assert "".join(arguments) == tool["arguments"] and len([a for a in arguments if a]) > 2
    whole = client.chat.completions.create(
        model=MODEL_NAME, messages=USER, extra_body={**body, "test_reasoning_field": "reasoning_content"}
    )
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls[0].function.arguments == tool["arguments"]
    assert extra(message, "reasoning_content") == "The user wants weather."
    old = chunks(raw_stream(server, test_reasoning="Old name.", test_reasoning_field="reasoning_content"))
    assert "".join(c["choices"][0]["delta"].get("reasoning_content", "") for c in old) == "Old name."


def test_scripted_status_error(server, client):
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model=MODEL_NAME, messages=USER, extra_body={"test_fail": {"status": 500}})
    assert caught.value.status_code == 500 and caught.value.body["type"] == "InternalServerError"
    with pytest.raises(openai.RateLimitError):
        fail = {"status": 429, "headers": {"retry-after": "0"}}
        client.chat.completions.create(model=MODEL_NAME, messages=USER, stream=True, extra_body={"test_fail": fail})


def test_drop_breaks_the_sdk_stream(server, client):
    body = {"test_script": "One two three four five six seven.", "test_fail": {"drop_after": 3}}
    stream = client.chat.completions.create(model=MODEL_NAME, messages=USER, stream=True, extra_body=body)
    received = []
    with pytest.raises((httpx.HTTPError, openai.APIError)):
        for chunk in stream:
            received.append(chunk)
    assert len(received) == 4  # the role chunk and 3 token chunks, then the socket closes
    assert server.completions[-1]["ended"] == "dropped"


def test_error_event_fails_the_stream(server, client):
    body = {"test_script": "One two three four.", "test_fail": {"error_event_after": 2}}
    with pytest.raises(openai.APIError, match="scripted error"):
        for _ in client.chat.completions.create(model=MODEL_NAME, messages=USER, stream=True, extra_body=body):
            pass
    lines = raw_stream(server, **body)
    assert json.loads(lines[-2][6:])["error"]["code"] == 500 and lines[-1] == "data: [DONE]"
    assert server.completions[-1]["ended"] == "error_event"


def test_pings_are_sse_comments(server, client):
    lines = raw_stream(server, test_script="Ping pong.", test_fail={"ping": True})
    assert ": ping" in lines and lines[-1] == "data: [DONE]"
    body = {"test_script": "Ping pong.", "test_fail": {"ping": True}}
    stream = client.chat.completions.create(model=MODEL_NAME, messages=USER, stream=True, extra_body=body)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == "Ping pong."


def test_client_that_leaves_stops_generation(server, client):
    before = server.aborted
    body = {"test_fail": {"delay_ms": 20}}
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=USER, stream=True, max_tokens=500, extra_body=body
    )
    for seen, _ in enumerate(stream):
        if seen == 3:
            break
    stream.close()
    assert server.wait_until(lambda: server.aborted == before + 1, timeout=5)
    record = server.completions[-1]
    assert record["ended"] == "aborted"
    generated = len(record["choices"][0]["ids"])
    time.sleep(0.2)
    assert len(server.completions[-1]["choices"][0]["ids"]) == generated < 50
    # A non-streaming client that times out is noticed too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.url}/chat/completions",
            json={"model": MODEL_NAME, "messages": USER, "max_tokens": 500, **body},
            headers={"Authorization": "Bearer sk-upstream"},
            timeout=0.3,
        )
    assert server.wait_until(lambda: server.aborted == before + 2, timeout=5)
    assert server.wait_until(lambda: server.active == 0, timeout=5)


def test_concurrent_async_clients(server):
    scripts = [f"Client {i} says {'la ' * (i % 5)}done ✓." for i in range(16)]

    async def one(sdk: openai.AsyncOpenAI, script: str) -> str:
        stream = await sdk.chat.completions.create(
            model=MODEL_NAME, messages=USER, stream=True, extra_body={"test_script": script}
        )
        return "".join([chunk.choices[0].delta.content or "" async for chunk in stream])

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.url, api_key="sk-upstream", max_retries=0) as sdk:
            return await asyncio.gather(*(one(sdk, script) for script in scripts))

    assert asyncio.run(main()) == scripts


def test_start_is_fast_and_stop_is_bounded_with_streams_in_flight(server):
    started = time.monotonic()
    upstream = UpstreamServer().start()  # the model is built (the module's server built it)
    assert time.monotonic() - started < 2
    opened = threading.Event()

    def slow_reader() -> None:
        body = {"model": MODEL_NAME, "messages": USER, "stream": True, "max_tokens": 1000}
        body["test_fail"] = {"delay_ms": 50}
        try:
            with httpx.stream("POST", f"{upstream.url}/chat/completions", json=body, timeout=10) as response:
                for _ in response.iter_lines():
                    opened.set()
        except httpx.HTTPError:
            pass

    reader = threading.Thread(target=slow_reader, daemon=True)
    reader.start()
    assert opened.wait(5)
    started = time.monotonic()
    upstream.stop()
    assert time.monotonic() - started < 4
    reader.join(5)
    assert not reader.is_alive()
    assert upstream.completions[-1]["ended"] == "shutdown" and upstream.active == 0 and upstream.aborted == 0


def test_benchmark_fields_stamp_chunks_and_skip_the_forward(server):
    # benchmarks/gateway.py measures per-chunk latency from these stamps.
    lines = raw_stream(server, test_script="One two three four.", test_timestamps=True, test_skip_forward=True)
    stamped = [chunk["sent_at"] for chunk in chunks(lines) if "sent_at" in chunk]
    assert len(stamped) >= 5 and stamped == sorted(stamped)
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks(lines) if chunk["choices"])
    assert text == "One two three four."
    # With a tag, the stamps are also handed over by GET /test/stamps/{tag}, once.
    lines = raw_stream(server, test_script="One two.", test_timestamps="tag-1", test_skip_forward=True)
    stamps = httpx.get(server.url.removesuffix("/v1") + "/test/stamps/tag-1").json()
    assert stamps == [chunk["sent_at"] for chunk in chunks(lines) if "sent_at" in chunk] and len(stamps) >= 3
    assert httpx.get(server.url.removesuffix("/v1") + "/test/stamps/tag-1").json() == []
