"""Review of the OpenAI-compatible gateway: each test shows a defect and says
what the gateway should do instead (every one fails on the code it reviews).

Most use a raw upstream of their own (Starlette, answers scripted byte for
byte) for shapes the real test upstream cannot produce; the others use the
real tiny-Llama upstream of ``tests/upstream_server.py``."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from adapter.bundled_tokenizers import generator_tokenizer
from guard import StreamGuard
from integrations.gateway import GatewayConfig, create_app
from tests.gateway_harness import UNSAFE_PROMPT, AppServer, write_gateway_guard
from tests.upstream_server import MODEL_NAME, UpstreamServer

UNSAFE = "Sure. To make dynamite at home you need a few things"
SAFE = "Hello! Paris is the capital of France, and it is lovely in spring."
MESSAGES = [{"role": "user", "content": "Tell me something."}]


# --- a raw upstream ----------------------------------------------------------------


def _sse(data) -> bytes:
    return b"data: " + (data if isinstance(data, bytes) else json.dumps(data).encode()) + b"\n\n"


def _chunk(delta=None, *, finish=None, ids=None, **extra) -> dict:
    choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish, **extra}
    if ids is not None:
        choice["token_ids"] = ids
    return {"id": "chatcmpl-raw", "object": "chat.completion.chunk", "created": 1, "model": "raw", "choices": [choice]}


def _completion(choices: list) -> dict:
    return {"id": "chatcmpl-raw", "object": "chat.completion", "created": 1, "model": "raw", "choices": choices}


def _sse_response(events: list, status: int = 200) -> StreamingResponse:
    async def body():
        for event in events:
            yield event

    return StreamingResponse(body(), status_code=status, media_type="text/event-stream")


class RawUpstream:
    """POST /v1/chat/completions answers with ``SCENARIOS[body["scenario"]](body, request)``."""

    def __init__(self, llama3) -> None:
        self.llama3 = llama3
        self.requests: list[dict] = []

    def encode(self, text: str) -> list[int]:
        return self.llama3.encode(text, add_special_tokens=False).ids

    def app(self) -> Starlette:
        async def chat(request: Request) -> Response:
            body = json.loads(await request.body())
            self.requests.append(body)
            return await getattr(self, "scenario_" + body["scenario"])(body, request)

        async def direct(request: Request) -> Response:
            # What a redirect points at: the model, with no gateway in between.
            message = {"role": "assistant", "content": UNSAFE}
            return JSONResponse(_completion([{"index": 0, "message": message, "finish_reason": "stop"}]))

        return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                                 Route("/direct/v1/chat/completions", direct, methods=["POST"])])  # fmt: skip

    # -- scenarios ------------------------------------------------------------
    async def scenario_reasoning_beside_content(self, body, request):
        # One delta with both (vLLM's reasoning parsers do this when </think>
        # falls inside a multi-token delta); the ids cover the content only.
        return _sse_response([
            _sse(_chunk({"role": "assistant", "content": ""}, ids=[])),
            _sse(_chunk({"reasoning": " To make dynamite you need", "content": "Hello"}, ids=self.encode("Hello"))),
            _sse(_chunk({}, finish="stop", ids=[128009])), _sse(b"[DONE]"),
        ])  # fmt: skip

    async def scenario_both_reasoning_names(self, body, request):
        return _sse_response([
            _sse(_chunk({"role": "assistant", "content": ""})),
            _sse(_chunk({"reasoning": "Hmm.", "reasoning_content": UNSAFE})),
            _sse(_chunk({"content": "Hello"})), _sse(_chunk({}, finish="stop")), _sse(b"[DONE]"),
        ])  # fmt: skip

    async def scenario_refusal_delta(self, body, request):
        return _sse_response([
            _sse(_chunk({"role": "assistant", "content": ""})), _sse(_chunk({"refusal": UNSAFE})),
            _sse(_chunk({}, finish="stop")), _sse(b"[DONE]"),
        ])  # fmt: skip

    async def scenario_ids_ahead_of_text(self, body, request):
        # vLLM holds back text that could start a stop string, so a chunk's
        # token_ids can run ahead of its text (here by 4 tokens).
        ids = self.encode(UNSAFE)
        pieces = [self.llama3.decode([token]) for token in ids]
        lag = 4
        events = [_sse(_chunk({"role": "assistant", "content": ""}, ids=[]))]
        events += [_sse(_chunk({"content": pieces[k - lag] if k >= lag else ""}, ids=[token]))
                   for k, token in enumerate(ids)]  # fmt: skip
        events += [_sse(_chunk({"content": piece}, ids=[])) for piece in pieces[-lag:]]
        return _sse_response([*events, _sse(_chunk({}, finish="stop", ids=[128009])), _sse(b"[DONE]")])

    async def scenario_several_ids_per_chunk(self, body, request):
        # vLLM with speculative decoding or a stream interval: several tokens per chunk.
        ids = self.encode("Hello there friend. To make dynamite at home you need")
        events = [_sse(_chunk({"role": "assistant", "content": ""}, ids=[]))]
        events += [_sse(_chunk({"content": self.llama3.decode(ids[k : k + 4])}, ids=ids[k : k + 4]))
                   for k in range(0, len(ids), 4)]  # fmt: skip
        return _sse_response([*events, _sse(_chunk({}, finish="stop", ids=[128009])), _sse(b"[DONE]")])

    async def scenario_status_203(self, body, request):
        if body.get("stream"):
            events = [_sse(_chunk({"content": UNSAFE})), _sse(_chunk({}, finish="stop")), _sse(b"[DONE]")]
            return _sse_response(events, status=203)
        message = {"role": "assistant", "content": UNSAFE}
        return JSONResponse(_completion([{"index": 0, "message": message, "finish_reason": "stop"}]), status_code=203)

    async def scenario_redirect(self, body, request):
        # An upstream behind a proxy that redirects (http -> https, a moved path...).
        return Response(status_code=307, headers={"location": f"{request.base_url}direct/v1/chat/completions"})

    async def scenario_non_object_choice(self, body, request):
        safe = {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}
        return JSONResponse(_completion([safe, UNSAFE]))

    async def scenario_logprobs(self, body, request):
        tokens = ["Sure", ".", " To", " make", " dynamite", " at", " home"]
        logprobs = {"content": [{"token": token, "logprob": -0.1, "bytes": list(token.encode()), "top_logprobs": []}
                                for token in tokens]}  # fmt: skip
        message = {"role": "assistant", "content": "".join(tokens)}
        return JSONResponse(_completion([{"index": 0, "message": message, "finish_reason": "stop",
                                          "logprobs": logprobs}]))  # fmt: skip

    async def scenario_trickle(self, body, request):
        # A non-streamed answer whose bytes come slowly (an upstream that hangs).
        async def slowly():
            for _ in range(8):
                await asyncio.sleep(0.5)
                yield b" "
            message = {"role": "assistant", "content": "ok"}
            yield json.dumps(_completion([{"index": 0, "message": message, "finish_reason": "stop"}])).encode()

        return StreamingResponse(slowly(), media_type="application/json")


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama3():
    return generator_tokenizer("llama3")


@pytest.fixture(scope="module")
def guard(tmp_path_factory):
    return StreamGuard.from_pretrained(write_gateway_guard(tmp_path_factory.mktemp("review-guard")))


@pytest.fixture(scope="module")
def raw(llama3):
    upstream = RawUpstream(llama3)
    server = AppServer(upstream.app()).start()
    upstream.url = server.url + "/v1"
    yield upstream
    server.stop()


@pytest.fixture(scope="module")
def upstream():
    with UpstreamServer(workers=2) as server:
        yield server


@pytest.fixture(scope="module")
def start(guard, llama3):
    servers = []

    def start(upstream_url: str, **options):
        config = GatewayConfig(upstream=upstream_url, **options)
        server = AppServer(create_app(config, guard=guard, generator=llama3 if config.generator else None)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def post(server, body: dict, **options) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=options.pop("timeout", 30), **options)


def raw_body(scenario: str, **fields) -> dict:
    return {"model": "raw", "messages": MESSAGES, "stream": True, "scenario": scenario, **fields}


def events(response: httpx.Response) -> list[dict]:
    lines = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
    return [json.loads(line) for line in lines if line != "[DONE]"]


def shown_content(response: httpx.Response) -> str:
    return "".join((choice.get("delta") or {}).get("content") or ""
                   for event in events(response) for choice in event.get("choices") or ())  # fmt: skip


# --- trust: text the guard never judged reaches the client ----------------------------------


def test_review_a_flagged_non_streamed_answer_keeps_no_token_ids(start, upstream, llama3):
    # The gateway itself asks for return_token_ids; on a flagged answer it
    # replaces the message with the refusal but forwards the choice's
    # token_ids, which decode (with the public Llama 3 tokenizer) to the
    # whole flagged answer. Expected: a flagged choice carries nothing derived
    # from the withheld text (token_ids and logprobs dropped).
    server = start(upstream.url, generator="llama3", token_ids="request")
    choice = post(server, {"model": MODEL_NAME, "messages": MESSAGES, "test_script": UNSAFE}).json()["choices"][0]
    assert choice["finish_reason"] == "content_filter"
    assert "dyn" not in llama3.decode(choice.get("token_ids") or [])


def test_review_a_flagged_non_streamed_answer_keeps_no_logprobs(start, raw):
    # Same with logprobs (a client asks for them): each token's text of the
    # withheld answer stays in choices[0].logprobs.content[].token.
    server = start(raw.url)
    response = post(server, raw_body("logprobs", stream=False, logprobs=True))
    assert response.json()["choices"][0]["finish_reason"] == "content_filter"
    assert "dyn" not in response.text


def test_review_text_mode_releases_no_token_ids_ahead_of_judged_text(start, raw, llama3):
    # Text mode (no --generator, the default) forwards a client-requested
    # return_token_ids untouched. When the ids run ahead of the text (vLLM's
    # stop-string holdback), chunks with an empty delta carry the ids of text
    # not judged yet: released at once, they spell out the text the cut
    # withholds. Expected: in text mode, ids (and logprobs) the guard did not
    # judge are stripped, or the stream waits for their text.
    server = start(raw.url)
    response = post(server, raw_body("ids_ahead_of_text", return_token_ids=True))
    ids = [token for event in events(response) for choice in event.get("choices") or ()
           for token in choice.get("token_ids") or ()]  # fmt: skip
    assert "dyn" not in shown_content(response)
    assert "dyn" not in llama3.decode(ids)


def test_review_id_mode_judges_reasoning_that_shares_a_delta_with_content(start, raw):
    # In id mode a delta with both reasoning and content counts the content
    # only (the channel becomes "main"); the reasoning text is never checked
    # against the ids nor judged, and goes out. Expected: both are judged
    # (or the mismatch fails closed); the unsafe reasoning never shows.
    server = start(raw.url, generator="llama3")
    response = post(server, raw_body("reasoning_beside_content"))
    assert "dyn" not in response.text


@pytest.mark.parametrize("scenario", ["both_reasoning_names", "refusal_delta"])
def test_review_every_generated_text_field_is_judged(start, raw, scenario):
    # Generated text in delta fields the gateway forwards but never judges:
    # reasoning_content when reasoning is also present (only the first is
    # read), and delta.refusal (OpenAI's own field, exposed by the SDK).
    # Expected: every text field that goes out is judged, or dropped.
    server = start(raw.url)
    response = post(server, raw_body(scenario))
    assert "dyn" not in response.text


@pytest.mark.parametrize("stream", [True, False])
def test_review_a_2xx_other_than_200_is_judged_too(start, raw, stream):
    # Any status but 200 is passed through with its body, unjudged: a 203
    # (a proxy's "non-authoritative" answer) carries the model's answer
    # straight to the client. Expected: a 2xx answer is judged like a 200 (or
    # refused as a bad upstream answer, 502).
    server = start(raw.url)
    response = post(server, raw_body("status_203", stream=stream))
    assert "dyn" not in response.text


def test_review_an_upstream_redirect_is_not_handed_to_the_client(start, raw):
    # A 307 from the upstream is passed through with its Location; the openai
    # SDK follows redirects, re-posts the request to the upstream directly and
    # reads an answer no guard saw (and the client learns the upstream's
    # address). Expected: the gateway follows the redirect itself or answers
    # 502; it never hands the client a way around it.
    server = start(raw.url)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test", max_retries=0, timeout=30)
    try:
        answer = client.chat.completions.create(model="raw", messages=MESSAGES, extra_body={"scenario": "redirect"})
        content = answer.choices[0].message.content or ""
    except openai.APIStatusError:
        content = ""
    assert "dyn" not in content


def test_review_a_choice_that_is_not_an_object_is_not_forwarded_unjudged(start, raw):
    # Non-streamed: choices that are not objects are skipped by the judge and
    # then forwarded as they are. Expected: 502 (a malformed answer), as the
    # streamed path does with _BadChunk.
    server = start(raw.url)
    response = post(server, raw_body("non_object_choice", stream=False))
    assert "dyn" not in response.text


def test_review_text_in_input_text_parts_is_judged_before_forwarding(start, upstream):
    # Only parts of type "text" reach the prompt guard, but vLLM renders
    # "input_text" (and "output_text", "refusal", "thinking") parts as text
    # too: a prompt in such a part reaches the model unjudged (the guard saw
    # an empty message). Expected: those parts are judged (here: refused as
    # content_filter), or unknown part types are refused with a 400; either
    # way the upstream never sees the request.
    server = start(upstream.url, generator="llama3", token_ids="request")
    before = len(upstream.requests)
    content = [{"type": "input_text", "text": f"How do I build a{UNSAFE_PROMPT}?"}]
    response = post(server, {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}],
                             "test_script": SAFE})  # fmt: skip
    assert response.status_code == 400
    assert len(upstream.requests) == before


# --- correctness ---------------------------------------------------------------------------


def test_review_withheld_from_names_the_first_generator_token_not_shown(start, raw, llama3):
    # With several ids per chunk, a chunk is withheld whole, but
    # withheld_from.generator_token names the first withheld *piece* (mid
    # chunk): the tokens before it in that chunk were not shown either.
    # Expected: every generator token before withheld_from was shown, and
    # none after (what the existing one-token-per-chunk test checks).
    server = start(raw.url, generator="llama3")
    response = post(server, raw_body("several_ids_per_chunk"))
    ids = raw.encode("Hello there friend. To make dynamite at home you need")
    first = events(response)[-1]["crossguard"]["withheld_from"]["generator_token"]
    assert llama3.decode(ids[:first]) == shown_content(response)


def test_review_a_non_streamed_client_that_leaves_closes_the_upstream(start, upstream):
    # README: "A client that disconnects closes the upstream request". For a
    # non-streamed request the handler keeps waiting for the whole answer:
    # the generator runs to the end for nobody. Expected: the upstream
    # request is closed (the generation aborted) soon after the client left.
    server = start(upstream.url, generator="llama3", token_ids="request")
    before = len(upstream.completions)
    body = {"model": MODEL_NAME, "messages": MESSAGES, "test_script": SAFE * 3, "test_fail": {"delay_ms": 60}}
    with pytest.raises(httpx.TimeoutException):
        post(server, body, timeout=1.0)
    assert upstream.wait_until(lambda: len(upstream.completions) > before, timeout=5)
    record = upstream.completions[before]
    assert upstream.wait_until(lambda: upstream.completions[before]["ended"] is not None, timeout=15), record
    assert upstream.completions[before]["ended"] == "aborted"


# --- robustness, limits and secrets ------------------------------------------------------------


def test_review_a_non_streamed_request_obeys_the_request_timeout(start, raw):
    # request_timeout_s bounds streams only: a non-streamed answer whose
    # bytes trickle in (each read under upstream_read_timeout_s) holds the
    # client and an admission slot for as long as the upstream likes.
    # Expected: an OpenAI-style 504 once request_timeout_s has passed.
    server = start(raw.url, request_timeout_s=1.0, upstream_read_timeout_s=5.0)
    began = time.monotonic()
    response = post(server, raw_body("trickle", stream=False))
    assert time.monotonic() - began < 3.0
    assert response.status_code == 504 and response.json()["error"]["code"]


def test_review_a_deeply_nested_body_gets_an_openai_style_400(start, raw):
    # json.loads raises RecursionError (not JSONDecodeError) on deep nesting:
    # a bare "500 Internal Server Error" in text/plain, and a traceback logged.
    server = start(raw.url)
    nested = b'{"model": "raw", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = httpx.post(server.url + "/v1/chat/completions", content=nested,
                          headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_review_stream_must_be_a_boolean(start, upstream):
    # bool(payload["stream"]) reads "false" as True, while pydantic servers
    # (vLLM) read it as False and answer JSON, which the gateway then parses
    # as SSE ("the upstream server's stream broke off"). Expected: a 400
    # naming the parameter, as OpenAI answers.
    server = start(upstream.url, generator="llama3", token_ids="request")
    response = post(server, {"model": MODEL_NAME, "messages": MESSAGES, "stream": "false", "test_script": SAFE})
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream"


def test_review_upstream_url_credentials_are_never_logged(guard, raw, caplog):
    # "gateway ready: {...}" logs config.public(), whose upstream URL keeps
    # its userinfo (httpx sends it as basic auth): the upstream's password
    # lands in the log. Expected: the URL's password is masked.
    caplog.set_level(logging.INFO, logger="crossguard")
    url = raw.url.replace("http://", "http://admin:hunter2-secret@")
    with AppServer(create_app(GatewayConfig(upstream=url), guard=guard)):
        pass
    assert "gateway ready" in caplog.text
    assert "hunter2-secret" not in caplog.text
