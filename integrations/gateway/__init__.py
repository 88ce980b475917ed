"""An OpenAI-compatible gateway that moderates any chat server with Qwen3Guard-Stream.

Users point their apps at the gateway instead of their vLLM, TGI, llama.cpp
or Ollama server. The gateway judges the prompt before forwarding it, then
re-emits the upstream's streamed chunks only once the guard has judged their
text (debounce-aware, ``integrations.withhold.StreamGate``), and cuts the
stream at a flag: the flagged text is withheld, a last chunk says
``finish_reason: "content_filter"`` with the verdict, then ``data: [DONE]``,
and the upstream request is closed so the generator stops. It relays only
what it judged: every chunk and answer is rebuilt from the fields it knows
(the allowlist in ``integrations.gateway.chunks``), the upstream's error
texts go to the log, and limits bound every wait and every buffer.

    crossguard serve --upstream http://127.0.0.1:8000/v1 --generator llama3

or, mounted by the user:

    from integrations.gateway import GatewayConfig, create_app
    app = create_app(GatewayConfig(upstream="http://127.0.0.1:8000/v1", generator="llama3"))
    # uvicorn.run(app, host="127.0.0.1", port=8080)

What is judged (every generated text, each as its own guard stream; see
``integrations.streams``): each choice's message text, its reasoning
(``delta.reasoning``, or the older ``reasoning_content``) in the guard's think
block, and the arguments of each tool call. When the upstream sends the
generator's token ids (vLLM's ``return_token_ids``) and the gateway knows the
generator's tokenizer, a choice's text is judged from its ids, so verdicts
name real generator tokens; otherwise from the text deltas. Chosen per
response and reported in the verdict metadata (``crossguard.mode``).

Shapes follow Azure OpenAI's content-filter convention, which clients
already read: a refused prompt is HTTP 400 with ``code: "content_filter"``
and ``innererror.content_filter_result``; streamed answers carry
``prompt_filter_results`` first and per-choice ``content_filter_results`` on
the cut; non-streamed answers get them on the response. Our own details
(risk level, probability, guard position, generator token) sit under
``crossguard`` keys, which other clients ignore.

Fail closed: a guard error ends the stream with an error event (the SDK
raises ``APIError``), never with text the guard did not judge;
``fail_open=True`` forwards unjudged text instead, for those who choose it.

The package, in the order a request flows through it: ``config`` (the
settings), ``prompt`` (request parsing and prompt judging), ``relay`` (the
upstream relay; ``sse`` reads its event stream), ``chunks`` (chunk rewriting:
what each chunk carries for the guard, and what is re-emitted), ``limits``
(limits and metrics), ``wire`` (error and verdict shapes), and ``app`` (the
ASGI app that ties them together).
"""

from __future__ import annotations

try:
    import fastapi  # noqa: F401
    import httpx  # noqa: F401
    import prometheus_client  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only without the extra
    from integrations.extras import install_hint

    raise ImportError(
        f"the gateway needs the 'gateway' extra ({error.name} is missing): {install_hint('gateway')}"
    ) from error

from integrations.gateway.app import Gateway, create_app
from integrations.gateway.config import DEFAULT_REFUSAL, GatewayConfig
from integrations.gateway.wire import GatewayError

__all__ = ["DEFAULT_REFUSAL", "Gateway", "GatewayConfig", "GatewayError", "create_app"]
