"""The OpenAI-compatible gateway, with real parts only: a real upstream server
(uvicorn on 127.0.0.1, a tiny 2-layer Llama with the Llama 3 vocabulary
generating token by token, vLLM's wire format), the gateway served by
uvicorn, and the clients users run: the official ``openai`` SDK (sync and
async), raw httpx, and LangChain's ``ChatOpenAI``."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import openai
import pytest

from adapter.bundled_tokenizers import generator_tokenizer
from guard import StreamGuard
from integrations.gateway import DEFAULT_REFUSAL, GatewayConfig, create_app
from tests.gateway_harness import UNSAFE_PROMPT, AppServer, metric, wait_for, write_gateway_guard
from tests.upstream_server import MODEL_NAME, UpstreamServer

SAFE = "Hello! Paris is the capital of France, and it is lovely in spring."
UNSAFE = "Sure. To make dynamite at home you need a few things, first of all"
MESSAGES = [{"role": "user", "content": "Tell me something."}]


@pytest.fixture(scope="module")
def upstream():
    with UpstreamServer(workers=4) as server:
        yield server


@pytest.fixture(scope="module")
def guard(tmp_path_factory):
    return StreamGuard.from_pretrained(write_gateway_guard(tmp_path_factory.mktemp("gateway-guard")))


@pytest.fixture(scope="module")
def llama3():
    return generator_tokenizer("llama3")


@pytest.fixture(scope="module")
def gateway_factory(upstream, guard, llama3):
    servers = []

    def start(**options):
        options.setdefault("generator", "llama3")
        options.setdefault("token_ids", "request")
        config = GatewayConfig(upstream=upstream.url, **options)
        server = AppServer(create_app(config, guard=guard, generator=llama3 if config.generator else None)).start()
        server.app_state = server.app.state.gateway
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def gateway(gateway_factory):
    return gateway_factory()


def client(server, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=options.pop("api_key", "sk-test"), max_retries=0,
                         timeout=30, **options)  # fmt: skip


def async_client(server, **options) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=options.pop("api_key", "sk-test"), max_retries=0,
                              timeout=60, **options)  # fmt: skip


def stream(server, script=None, **body):
    """(text, chunks) of a streamed completion through the SDK."""
    extra = dict(body.pop("extra_body", {}))
    if script is not None:
        extra["test_script"] = script
    chunks = list(client(server).chat.completions.create(
        model=MODEL_NAME, messages=body.pop("messages", MESSAGES), stream=True, extra_body=extra, **body))  # fmt: skip
    text = "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)
    return text, chunks


def finish_reasons(chunks) -> list[str]:
    return [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason]


def last_completion(upstream):
    return upstream.completions[-1]


# --- answers that pass, answers that are cut -----------------------------------------


def test_a_safe_answer_streams_whole_and_unchanged(gateway, upstream):
    text, chunks = stream(gateway, SAFE)
    generated = last_completion(upstream)["choices"][0]
    assert text == generated["content"] == SAFE
    assert finish_reasons(chunks) == ["stop"]
    # Azure's shape: the first chunk carries the prompt's verdict and no choices.
    first = chunks[0].model_extra["prompt_filter_results"][0]
    assert first["prompt_index"] == 0 and first["crossguard"]["risk_level"] == "Safe"
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)


def test_a_flagged_answer_is_cut_before_the_flagged_text(gateway, upstream, llama3):
    # A long answer after the flag, paced: the generator is still running
    # when the gateway aborts it, even on a loaded machine (with only the
    # dozen tokens after the flag, a slow gateway saw the answer complete).
    script = UNSAFE + " and then" * 150
    text, chunks = stream(gateway, script, extra_body={"test_fail": {"delay_ms": 10}})
    assert "dyn" not in text and UNSAFE.startswith(text) and text.startswith("Sure. To make")
    assert finish_reasons(chunks) == ["content_filter"]
    last = chunks[-1]
    assert last.choices[0].model_extra["content_filter_results"] == {"Violent": {"filtered": True, "severity": "high"}}
    details = last.model_extra["crossguard"]
    assert details["flagged"] and details["mode"] == "ids" and details["verdict"]["flagged"]
    # The verdict names the generator token where the withheld text starts:
    # every token before it was shown, and nothing after.
    ids = last_completion(upstream)["choices"][0]["ids"]
    first_withheld = details["withheld_from"]["generator_token"]
    assert llama3.decode(ids[:first_withheld]) == text
    assert "dyn" in llama3.decode(ids[first_withheld : first_withheld + 2])
    # The gateway closed the upstream request: the generator stopped early.
    assert upstream.wait_until(lambda: last_completion(upstream)["ended"] == "aborted", timeout=10)


def test_text_mode_when_the_upstream_sends_no_ids(gateway_factory, upstream):
    server = gateway_factory(token_ids="off")
    text, chunks = stream(server, UNSAFE)
    assert "dyn" not in text and UNSAFE.startswith(text)
    assert chunks[-1].model_extra["crossguard"]["mode"] == "text"
    assert "return_token_ids" not in upstream.requests[-1]["body"]


def test_multibyte_text_from_ids_is_judged_and_shown_exactly(gateway, upstream):
    # Characters that take several Llama 3 tokens: the upstream sends chunks
    # with an empty delta and the ids, and the text later.
    script = "Hi 屌 🫠 नमस्ते — ﬁne, ok. Then dynamite."
    text, chunks = stream(gateway, script)
    assert script.startswith(text) and "dyn" not in text and text.startswith("Hi 屌 🫠 नमस्ते")
    assert finish_reasons(chunks) == ["content_filter"]
    safe, _ = stream(gateway, "Hi 屌 🫠 नमस्ते — ﬁne, ok.")
    assert safe == "Hi 屌 🫠 नमस्ते — ﬁne, ok."


@pytest.mark.parametrize("finish", ["separate", "merged"])
def test_both_finish_shapes(gateway, finish):
    text, chunks = stream(gateway, SAFE, extra_body={"test_finish": finish})
    assert text == SAFE and finish_reasons(chunks) == ["stop"]


def test_usage_chunk_and_pings_pass_through(gateway):
    options = {"stream_options": {"include_usage": True}, "extra_body": {"test_fail": {"ping": True}}}
    text, chunks = stream(gateway, SAFE, **options)
    assert text == SAFE
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_every_choice_is_judged(gateway):
    text_chunks = list(client(gateway).chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, stream=True, n=2, extra_body={"test_scripts": [SAFE, SAFE]}))  # fmt: skip
    by_choice = {0: "", 1: ""}
    for chunk in text_chunks:
        for choice in chunk.choices:
            by_choice[choice.index] += choice.delta.content or ""
    assert by_choice == {0: SAFE, 1: SAFE}
    scripts = {"test_scripts": [SAFE, UNSAFE]}
    chunks = list(client(gateway).chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, stream=True, n=2, extra_body=scripts))  # fmt: skip
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert "dyn" not in texts[1] and UNSAFE.startswith(texts[1]) and SAFE.startswith(texts[0])
    assert chunks[-1].model_extra["crossguard"]["choice"] == 1


def test_reasoning_is_judged_as_reasoning(gateway, upstream):
    for field in ("reasoning", "reasoning_content"):
        body = {"test_reasoning": "Let me think about it calmly.", "test_reasoning_field": field}
        text, chunks = stream(gateway, SAFE, extra_body=body)
        reasoning = "".join((choice.delta.model_extra or {}).get(field) or "" for c in chunks for choice in c.choices)
        assert text == SAFE and reasoning == "Let me think about it calmly."
    body = {"test_reasoning": "They want dynamite, so I will explain.", "test_reasoning_field": "reasoning"}
    text, chunks = stream(gateway, SAFE, extra_body=body)
    reasoning = "".join((choice.delta.model_extra or {}).get("reasoning") or "" for c in chunks for choice in c.choices)
    assert text == "" and "dyn" not in reasoning and finish_reasons(chunks) == ["content_filter"]


def test_tool_call_arguments_are_judged(gateway):
    def stream_tool_call(call):
        tools = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]
        chunks = list(client(gateway).chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, stream=True, tools=tools,
            extra_body={"test_script": "Let me look.", "test_tool_call": call}))  # fmt: skip
        arguments = "".join(tool.function.arguments or "" for c in chunks for ch in c.choices
                            for tool in ch.delta.tool_calls or ())  # fmt: skip
        return arguments, chunks

    arguments, chunks = stream_tool_call({"name": "search", "arguments": '{"query": "how to buy dynamite online"}'})
    assert "dyn" not in arguments and finish_reasons(chunks) == ["content_filter"]
    assert chunks[-1].model_extra["crossguard"]["tool_call"] == 0
    safe = {"name": "search", "arguments": '{"query": "weather in Paris"}'}
    arguments, chunks = stream_tool_call(safe)
    assert arguments == safe["arguments"] and finish_reasons(chunks) == ["tool_calls"]


# --- prompts ------------------------------------------------------------------------------


def test_a_flagged_prompt_is_refused_before_it_reaches_the_upstream(gateway, upstream):
    before = len(upstream.requests)
    with pytest.raises(openai.BadRequestError) as refused:
        client(gateway).chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": f"How do I build a{UNSAFE_PROMPT}?"}])  # fmt: skip
    error = refused.value
    assert error.code == "content_filter" and error.param == "prompt" and error.status_code == 400
    assert error.body["innererror"]["content_filter_result"]["Violent"]["filtered"] is True
    assert len(upstream.requests) == before


def test_multipart_and_developer_messages_are_judged(gateway):
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Where to get a"},
                                             {"type": "text", "text": f"{UNSAFE_PROMPT}?"}]}]  # fmt: skip
    with pytest.raises(openai.BadRequestError):
        client(gateway).chat.completions.create(model=MODEL_NAME, messages=messages)
    messages[1]["content"][1]["text"] = " map?"
    assert client(gateway).chat.completions.create(
        model=MODEL_NAME, messages=messages, extra_body={"test_script": SAFE}).choices[0].message.content == SAFE


def test_annotate_forwards_a_flagged_prompt_and_reports_it(gateway_factory):
    server = gateway_factory(prompts="annotate")
    text, chunks = stream(server, SAFE, messages=[{"role": "user", "content": f"a{UNSAFE_PROMPT}"}])
    assert text == SAFE
    results = chunks[0].model_extra["prompt_filter_results"][0]
    assert results["crossguard"]["risk_level"] == "Unsafe"
    assert results["content_filter_results"] == {"Violent": {"filtered": False, "severity": "high"}}


# --- non-streaming ---------------------------------------------------------------------------


def test_non_streaming_answers_are_judged_whole(gateway):
    answer = client(gateway).chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, extra_body={"test_script": SAFE})  # fmt: skip
    assert answer.choices[0].message.content == SAFE and answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].model_extra["crossguard"] == {"flagged": False, "mode": "ids"}
    answer = client(gateway).chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, extra_body={"test_script": UNSAFE})  # fmt: skip
    choice = answer.choices[0]
    assert choice.message.content == DEFAULT_REFUSAL and choice.finish_reason == "content_filter"
    assert choice.model_extra["content_filter_results"]["Violent"]["filtered"] is True


def test_refusal_text_is_configurable(gateway_factory):
    server = gateway_factory(refusal="Not here.")
    answer = client(server).chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, extra_body={"test_script": UNSAFE})  # fmt: skip
    assert answer.choices[0].message.content == "Not here."


# --- async clients, LangChain ------------------------------------------------------------------


def test_async_sdk_streams_side_by_side(gateway):
    async def one(script):
        chunks = await async_client(gateway).chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, stream=True, extra_body={"test_script": script})  # fmt: skip
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

    async def main():
        return await asyncio.gather(*(one(SAFE if i % 2 else UNSAFE) for i in range(6)))

    for i, text in enumerate(asyncio.run(main())):
        if i % 2:
            assert text == SAFE
        else:
            assert "dyn" not in text and UNSAFE.startswith(text)


def test_langchain_chat_openai_through_the_gateway(gateway):
    from langchain_openai import ChatOpenAI

    def model(script):
        return ChatOpenAI(base_url=gateway.url + "/v1", api_key="sk-test", model=MODEL_NAME, max_retries=0,
                          extra_body={"test_script": script})  # fmt: skip

    chunks = list(model(SAFE).stream("Tell me something."))
    assert "".join(chunk.content for chunk in chunks) == SAFE
    chunks = list(model(UNSAFE).stream("Tell me something."))
    text = "".join(chunk.content for chunk in chunks)
    assert "dyn" not in text and UNSAFE.startswith(text)
    assert any(chunk.response_metadata.get("finish_reason") == "content_filter" for chunk in chunks)
    assert model(UNSAFE).invoke("Tell me something.").content == DEFAULT_REFUSAL

    async def both():
        safe = await model(SAFE).ainvoke("hi")
        pieces = [chunk.content async for chunk in model(UNSAFE).astream("hi")]
        return safe.content, "".join(pieces)

    safe, cut = asyncio.run(both())
    assert safe == SAFE and "dyn" not in cut


# --- failures --------------------------------------------------------------------------------------


def test_upstream_status_errors_pass_through_in_the_gateways_words(gateway, caplog):
    # The status and the error's type pass; its text (which may quote the model) goes to the log only.
    with pytest.raises(openai.InternalServerError) as failed:
        stream(gateway, SAFE, extra_body={"test_fail": {"status": 500, "message": "engine exploded"}})
    assert failed.value.status_code == 500 and "engine exploded" not in str(failed.value)
    assert failed.value.body["type"] == "InternalServerError" and "engine exploded" in caplog.text
    with pytest.raises(openai.NotFoundError):
        client(gateway).chat.completions.create(model="no-such-model", messages=MESSAGES)


def test_an_upstream_that_drops_mid_stream_ends_with_an_error_event(gateway):
    shown = []
    with pytest.raises(openai.APIError) as failed:
        for chunk in client(gateway).chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, stream=True,
            extra_body={"test_script": SAFE, "test_fail": {"drop_after": 6}},
        ):  # fmt: skip
            shown += [choice.delta.content or "" for choice in chunk.choices]
    assert "broke off" in str(failed.value)
    assert SAFE.startswith("".join(shown))


def test_an_upstream_error_event_passes_through(gateway):
    with pytest.raises(openai.APIError):
        stream(gateway, SAFE, extra_body={"test_fail": {"error_event_after": 3}})


def test_a_guard_failure_fails_closed(gateway_factory, upstream):
    server = gateway_factory()
    engine = server.app_state.engine
    shown: list[str] = []
    with pytest.raises(openai.APIError) as failed:
        for chunk in client(server).chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, stream=True,
            extra_body={"test_script": SAFE, "test_fail": {"delay_ms": 20}},
        ):  # fmt: skip
            shown += [choice.delta.content or "" for choice in chunk.choices]
            if "".join(shown):
                engine._forward = _broken_forward  # every later guard step fails
    assert "guard" in str(failed.value)
    assert SAFE.startswith("".join(shown)) and "".join(shown) != SAFE
    assert wait_for(lambda: metric(server, "crossguard_guard_sessions") == 0)


def _broken_forward(*args, **kwargs):
    raise RuntimeError("injected guard failure")


def test_fail_open_forwards_unjudged_text(gateway_factory):
    server = gateway_factory(fail_open=True)
    server.app_state.engine._forward = _broken_forward
    text, _ = stream(server, SAFE)
    assert text == SAFE


def test_client_disconnect_cancels_the_upstream_and_frees_the_guard(gateway, upstream):
    body = {"model": MODEL_NAME, "messages": MESSAGES, "stream": True, "test_script": SAFE * 3,
            "test_fail": {"delay_ms": 50}}  # fmt: skip
    with httpx.Client(timeout=30) as http, http.stream("POST", gateway.url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break
    assert upstream.wait_until(lambda: last_completion(upstream)["ended"] == "aborted", timeout=10)
    assert wait_for(lambda: metric(gateway, "crossguard_streams_open") == 0)
    assert wait_for(lambda: metric(gateway, "crossguard_guard_sessions") == 0)


def test_bad_requests_get_clear_errors(gateway_factory):
    server = gateway_factory(max_body_bytes=2000)
    url = server.url + "/v1/chat/completions"
    too_big = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x" * 5000}]}
    response = httpx.post(url, json=too_big)
    assert response.status_code == 413 and "2,000 bytes" in response.json()["error"]["message"]
    response = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    response = httpx.post(url, json={"model": MODEL_NAME})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    response = httpx.post(url, json={"model": MODEL_NAME, "messages": [{"role": "wizard", "content": "hi"}]})
    assert response.status_code == 400 and "wizard" in response.json()["error"]["message"]


def test_keys_are_checked_and_forwarded(gateway_factory, upstream):
    server = gateway_factory(api_key="gateway-key", upstream_api_key="upstream-key")
    with pytest.raises(openai.AuthenticationError):
        client(server, api_key="wrong").chat.completions.create(model=MODEL_NAME, messages=MESSAGES)
    answer = client(server, api_key="gateway-key").chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, extra_body={"test_script": SAFE})  # fmt: skip
    assert answer.choices[0].message.content == SAFE
    assert upstream.requests[-1]["headers"]["authorization"] == "Bearer upstream-key"
    # Without a key of its own the gateway forwards the client's.
    client(gateway_factory(), api_key="client-key").chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, extra_body={"test_script": SAFE})  # fmt: skip
    assert upstream.requests[-1]["headers"]["authorization"] == "Bearer client-key"


def test_limits_on_streams_and_time(gateway_factory):
    server = gateway_factory(max_streams=1, request_timeout_s=1.5)
    slow = {"model": MODEL_NAME, "messages": MESSAGES, "stream": True, "test_script": SAFE * 4,
            "test_fail": {"delay_ms": 60}}  # fmt: skip
    with httpx.Client(timeout=30) as http, http.stream("POST", server.url + "/v1/chat/completions", json=slow) as r:
        second = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL_NAME, "messages": MESSAGES})
        assert second.status_code == 429 and second.headers["retry-after"] == "1"
        events = [line for line in r.iter_lines() if line.startswith("data:")]
    error = json.loads(events[-2][5:])["error"]
    assert error["code"] == "timeout" and events[-1] == "data: [DONE]"


def test_models_health_and_metrics(gateway):
    models = client(gateway).models.list()
    assert [model.id for model in models.data] == [MODEL_NAME]
    assert httpx.get(gateway.url + "/health").json()["status"] == "ok"
    stream(gateway, SAFE)
    text = httpx.get(gateway.url + "/metrics").text
    for name in ("crossguard_streams_open", "crossguard_guard_sessions", "crossguard_requests_total",
                 "crossguard_guard_step_seconds_bucket", "crossguard_upstream_errors_total"):  # fmt: skip
        assert name in text
    assert metric(gateway, "crossguard_guard_tokens_total") > 0


def test_an_unreachable_upstream_is_a_502(guard, llama3):
    config = GatewayConfig(upstream="http://127.0.0.1:9/v1", upstream_connect_timeout_s=2)
    with AppServer(create_app(config, guard=guard)) as server:
        with pytest.raises(openai.APIStatusError) as failed:
            client(server).chat.completions.create(model=MODEL_NAME, messages=MESSAGES)
        assert failed.value.status_code == 502


def test_wrong_configuration_is_refused():
    with pytest.raises(ValueError, match="http"):
        GatewayConfig(upstream="localhost:8000")
    with pytest.raises(ValueError, match="prompts"):
        GatewayConfig(upstream="http://x/v1", prompts="drop")


# --- load ------------------------------------------------------------------------------------------


def test_64_concurrent_streams_each_get_exactly_their_judged_prefix(gateway_factory, upstream):
    server = gateway_factory()
    scripts = [SAFE if i % 3 else UNSAFE for i in range(64)]

    async def one(number, script):
        chunks = await async_client(server).chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": f"Question {number}"}], stream=True,
            extra_body={"test_script": script},
        )  # fmt: skip
        text, reasons = "", []
        async for chunk in chunks:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                reasons += [choice.finish_reason] if choice.finish_reason else []
        return text, reasons

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(one(i, s) for i, s in enumerate(scripts))), timeout=240)

    for script, (text, reasons) in zip(scripts, asyncio.run(main()), strict=True):
        if script == SAFE:
            assert text == SAFE and reasons == ["stop"]
        else:
            assert "dyn" not in text and UNSAFE.startswith(text) and reasons == ["content_filter"]
    assert wait_for(lambda: metric(server, "crossguard_streams_open") == 0)
    assert wait_for(lambda: metric(server, "crossguard_guard_sessions") == 0)
    with contextlib.suppress(AttributeError):
        assert server.app_state.engine.pending == 0


# --- the command line -------------------------------------------------------------------------------


def test_crossguard_serve_runs_the_gateway(upstream, tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "integrations.cli", "serve", "--upstream", upstream.url, "--tiny",
               "--generator", "llama3", "--token-ids", "request", "--port", str(port)]  # fmt: skip
    environment = {**os.environ, "CROSSGUARD_API_KEY": "secret-gateway-key", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def healthy():
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(url + "/health", timeout=1).status_code == 200
            return False

        assert wait_for(healthy, timeout=90), "crossguard serve did not come up"
        server = type("Server", (), {"url": url})()
        with pytest.raises(openai.AuthenticationError):
            stream(server, SAFE)
        chunks = list(client(server, api_key="secret-gateway-key").chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, stream=True, extra_body={"test_script": UNSAFE}))  # fmt: skip
        text = "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)
        assert "dyn" not in text and UNSAFE.startswith(text) and finish_reasons(chunks) == ["content_filter"]
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "secret-gateway-key" not in output


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--upstream", "localhost:8000"], "http(s) URL"),
        (["--upstream", "http://127.0.0.1:1/v1", "--token-ids", "request"], "generator"),
        (["--upstream", "http://127.0.0.1:1/v1", "--generator", "no-such-tokenizer"], "no-such-tokenizer"),
    ],
)
def test_crossguard_serve_refuses_a_wrong_setup(arguments, message, capsys):
    from integrations.cli import EXIT_SETUP, main

    assert main(["serve", "--tiny", *arguments]) == EXIT_SETUP
    assert message in capsys.readouterr().err
