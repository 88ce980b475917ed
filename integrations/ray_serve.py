"""The moderating gateway on Ray Serve: many replicas, one GuardEngine each.

Needs the ``ray`` extra (``pip install -e '.[ray]'`` in a checkout). Every replica
builds the very app ``crossguard serve`` runs,
``integrations.gateway.create_app(config)``; its lifespan loads the guard and
starts the replica's ``GuardEngine`` when Serve starts the replica, and stops
them when Serve stops it. Serve's HTTP proxy routes each request to a replica
and relays its server-sent events chunk by chunk.

    crossguard serve --ray --replicas 2 --upstream http://127.0.0.1:8000/v1 --generator llama3

or with Serve's own command line (``key=value`` arguments, or a config file
whose application has ``import_path: integrations.ray_serve:app_builder``
and the same keys under ``args``)::

    serve run integrations.ray_serve:app_builder upstream=http://127.0.0.1:8000/v1 generator=llama3 replicas=2

or from Python::

    from ray import serve
    from integrations.gateway import GatewayConfig
    from integrations.ray_serve import build_deployment

    serve.run(build_deployment(GatewayConfig(upstream=..., generator="llama3"), replicas=4, num_gpus=1))

What a replica adds to the gateway:

* every response carries ``x-crossguard-replica: <replica id>`` (Serve's
  replica tag; its actor is ``SERVE_REPLICA::<app>#<deployment>#<tag>`` in
  the ``serve`` namespace);
* Serve's health check fails once the replica's guard engine is closed, and
  Serve then replaces the replica;
* ``max_ongoing_requests`` defaults to ``config.max_streams``: the proxy
  queues requests beyond a replica's limit, or sends them to another
  replica, instead of the replica refusing them with 429.

A replica that dies mid-stream (its process, its node): the proxy drops its
clients' connections without the end of the chunked body, so every HTTP
client raises (httpx: ``RemoteProtocolError``, ``openai``: ``APIError``);
such a stream never ends cleanly and never carries text the guard did not
judge (a replica only ever sent judged text). New requests go to the live
replicas, and Serve starts a replacement.

The guard must load on every node: a Hugging Face repo id (downloaded once
per node) or a folder present at the same path on each; crossguard must be
installed on each node too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
import types
import typing
from collections.abc import Mapping
from typing import Any

__all__ = ["REPLICA_HEADER", "app_builder", "build_deployment", "replica_config", "run_on_ray"]

REPLICA_HEADER = "x-crossguard-replica"
DEFAULT_APP_NAME = "crossguard"
DEFAULT_DEPLOYMENT_NAME = "crossguard"
# The keys app_builder takes besides GatewayConfig's fields.
_DEPLOYMENT_ARGS = {
    "replicas": int,
    "num_gpus": float,
    "num_cpus": float,
    "max_ongoing_requests": int,
    "autoscaling": dict,
}


def _serve() -> Any:
    try:
        from ray import serve
    except ImportError as error:
        from integrations.extras import install_hint

        raise ImportError(
            f"the gateway on Ray Serve needs the 'ray' extra ({error.name or 'ray'} is missing): {install_hint('ray')}"
        ) from error
    return serve


class ReplicaHeader:
    """ASGI middleware: name the replica in the headers of every HTTP response."""

    def __init__(self, app: Any, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode("latin-1"), replica.encode("latin-1"))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)


def _replica_app(config: Any) -> Any:
    """The gateway app of one replica (runs in the replica, at its start)."""
    from integrations.gateway import create_app

    app = create_app(config)
    app.add_middleware(ReplicaHeader, replica=_serve().get_replica_context().replica_tag)
    return app


def replica_config(config: Any, num_gpus: float) -> Any:
    """The config a replica runs: with no GPU reserved and no ``device``
    chosen, the CPU (a replica sees the node's GPUs even when it reserved none)."""
    if num_gpus == 0 and config.device is None:
        return dataclasses.replace(config, device="cpu")
    return config


def build_deployment(
    config: Any,
    *,
    replicas: int = 1,
    num_gpus: float = 0,
    num_cpus: float | None = None,
    autoscaling: Mapping[str, Any] | None = None,
    max_ongoing_requests: int | None = None,
    name: str = DEFAULT_DEPLOYMENT_NAME,
    **options: Any,
) -> Any:
    """A bound Serve application (for ``serve.run``) of the gateway on ``config``.

    ``replicas``: how many replicas, each with its own guard and
    ``GuardEngine``. ``num_gpus`` (per replica, may be a fraction so that
    replicas share a GPU) and ``num_cpus`` (Ray's default: 1) are the Ray
    resources each reserves. With ``num_gpus=0`` and no ``config.device``, the
    guard runs on the CPU (Ray does not hide the node's GPUs from a replica
    that reserved none); with ``num_gpus > 0`` it runs on the GPU Ray assigned.

    ``autoscaling``: Serve's ``autoscaling_config`` (then ``replicas`` is the
    most replicas, unless it sets ``max_replicas``): the replica count
    follows the requests in flight, ``target_ongoing_requests`` per replica
    (default half of ``max_ongoing_requests``), between ``min_replicas``
    (default 1) and ``max_replicas``.

    ``max_ongoing_requests``: requests (streams) one replica serves at once;
    default ``config.max_streams``. Other keywords go to Serve's
    ``Deployment.options`` as they are (``health_check_period_s``,
    ``graceful_shutdown_timeout_s``, ...).
    """
    serve = _serve()
    from integrations.gateway import GatewayConfig

    if not isinstance(config, GatewayConfig):
        raise TypeError(f"config must be an integrations.gateway.GatewayConfig, got {type(config).__name__}")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be a positive int, got {replicas!r}")
    if not num_gpus >= 0:
        raise ValueError(f"num_gpus must be 0 or more, got {num_gpus!r}")
    config = replica_config(config, num_gpus)
    if max_ongoing_requests is None:
        max_ongoing_requests = config.max_streams
    actor_options: dict[str, Any] = {"num_gpus": num_gpus}
    if num_cpus is not None:
        actor_options["num_cpus"] = num_cpus
    settings: dict[str, Any] = {
        "name": name,
        "ray_actor_options": actor_options,
        "max_ongoing_requests": max_ongoing_requests,
        **options,
    }
    if autoscaling is not None:
        settings["autoscaling_config"] = {
            "min_replicas": 1,
            "max_replicas": replicas,
            "target_ongoing_requests": max(1, max_ongoing_requests // 2),
            **autoscaling,
        }
    else:
        settings["num_replicas"] = replicas

    def build_app() -> Any:  # called in each replica, as it starts
        return _replica_app(config)

    @serve.ingress(build_app)
    class CrossguardGateway:
        def check_health(self) -> None:
            gateway = getattr(getattr(self.app, "state", None), "gateway", None)
            if gateway is None or not gateway.ready:
                raise RuntimeError("the replica's guard engine is not running")

    return serve.deployment(CrossguardGateway).options(**settings).bind()


def app_builder(args: Mapping[str, Any]) -> Any:
    """The application for ``serve run integrations.ray_serve:app_builder key=value ...``
    and for Serve config files (``import_path: integrations.ray_serve:app_builder``,
    the keys under ``args``): ``GatewayConfig``'s fields (``upstream``,
    ``generator``, ``guard``, ``mode``, ...) and ``build_deployment``'s
    ``replicas``, ``num_gpus``, ``num_cpus``, ``max_ongoing_requests`` and
    ``autoscaling`` (a mapping, or its JSON on the command line). API keys
    are read from ``CROSSGUARD_API_KEY`` and ``CROSSGUARD_UPSTREAM_API_KEY``
    where the application is built, as ``crossguard serve`` reads them."""
    from integrations.gateway import GatewayConfig

    hints = typing.get_type_hints(GatewayConfig)
    fields = {f.name for f in dataclasses.fields(GatewayConfig)}
    unknown = sorted(set(args) - fields - set(_DEPLOYMENT_ARGS))
    if unknown:
        raise ValueError(
            f"unknown argument(s) {', '.join(unknown)}; the gateway takes {', '.join(sorted(fields))} and "
            f"Ray Serve {', '.join(_DEPLOYMENT_ARGS)}"
        )
    values = {key: _coerce(key, value, hints[key]) for key, value in args.items() if key in fields}
    # Keys come from the environment, as for `crossguard serve`: never from a config file.
    values.setdefault("api_key", os.environ.get("CROSSGUARD_API_KEY"))
    values.setdefault("upstream_api_key", os.environ.get("CROSSGUARD_UPSTREAM_API_KEY"))
    config = GatewayConfig(**values)
    deployment = {key: _coerce(key, value, kind) for key, value in args.items() if (kind := _DEPLOYMENT_ARGS.get(key))}
    return build_deployment(config, **deployment)


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """``value`` as ``kind``: ``key=value`` arguments arrive as strings."""
    if not isinstance(value, str):
        return value
    kinds = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    if type(None) in kinds and value.lower() in ("none", "null"):
        return None
    try:
        for one in kinds:
            if one is bool:
                lowered = value.lower()
                if lowered in ("true", "1", "yes", "on"):
                    return True
                if lowered in ("false", "0", "no", "off"):
                    return False
                raise ValueError("not a boolean")
            if one is int:
                return int(value)
            if one is float:
                return float(value)
            if one is dict:
                parsed = json.loads(value)
                if not isinstance(parsed, dict):
                    raise ValueError("not a JSON object")
                return parsed
    except ValueError as error:
        raise ValueError(f"{key}={value!r}: {error}") from None
    return value


def run_on_ray(
    config: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    name: str = DEFAULT_APP_NAME,
    route_prefix: str = "/",
    blocking: bool = True,
    **deployment: Any,
) -> int:
    """Serve the gateway on Ray Serve at ``http://host:port`` (what
    ``crossguard serve --ray`` runs). ``address``: the Ray cluster to join
    (None: ``RAY_ADDRESS``, else the cluster ``ray start`` runs on this
    machine, else a new local one); ``deployment``: ``build_deployment``'s
    keywords (``replicas``, ``num_gpus``, ``autoscaling``, ...).

    Blocks until interrupted (Ctrl-C or SIGTERM) unless ``blocking=False``;
    then removes the application (its replicas stop their engines), leaves
    the Ray cluster (a local one that it started stops) and returns 0."""
    serve = _serve()
    import ray

    application = build_deployment(config, **deployment)
    joined = not ray.is_initialized()
    if joined:
        ray.init(address=address)
    if not blocking:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application, name=name, route_prefix=route_prefix)
        return 0
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application, name=name, route_prefix=route_prefix)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        try:
            serve.delete(name)
        finally:
            if joined:
                ray.shutdown()
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
