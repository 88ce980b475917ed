"""The gateway on Ray Serve (integrations.ray_serve): a local Ray cluster (one
per module), two CPU replicas of the gateway with the tiny guard behind Serve's
own HTTP proxy, and the real upstream test server.

Needs the ``ray`` extra; without it only the tests that need no Ray run.
Every wait is bounded: requests by httpx timeouts and ``asyncio.wait_for``,
cluster state by deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from integrations.gateway import GatewayConfig

APP, DEPLOYMENT = "crossguard", "crossguard"
REPLICAS = 2
# One replica serves at most this many streams; Serve queues the rest or sends
# them to the other replica, so CONCURRENT clients must use both replicas.
MAX_STREAMS = 4
CONCURRENT = 2 * MAX_STREAMS
LONG = 4  # fillers in the answers cut by the kill
STARTUP_S = 120.0  # a replica imports torch and loads the guard
REQUEST_S = 60.0
PROMPT = [{"role": "user", "content": "How do I get rid of an old tree stump in my garden?"}]
SAFE_TEXT = " You can dig the stump out, rent a grinder, or use"
FILLER = " Water it often, wait a season, and the wood softens."
FLAGGED_TEXT = " dynamite to blast it. Digging is safest."


def judged(client: int, filler: int = 0) -> str:
    """What a client must get: its answer up to the flagged text, exactly
    (distinct per client, so that a mix-up shows)."""
    return f"Client {client} says:{FILLER * filler}{SAFE_TEXT}"


def script(client: int, filler: int = 0) -> str:
    """The upstream's answer to a client: the safe text, then text the guard flags."""
    return judged(client, filler) + FLAGGED_TEXT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- without a cluster ------------------------------------------------------------


def config(**overrides: Any) -> GatewayConfig:
    return GatewayConfig(upstream="http://127.0.0.1:9/v1", **overrides)


def test_without_ray_the_error_names_the_extra(monkeypatch):
    from integrations import ray_serve

    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[ray\]'"):
        ray_serve.build_deployment(config())


def deployment_of(application: Any) -> Any:
    return application._bound_deployment  # Serve has no public accessor


def test_build_deployment_options():
    pytest.importorskip("ray.serve")
    from integrations.ray_serve import build_deployment, replica_config

    fixed = deployment_of(build_deployment(config(max_streams=32), replicas=3, num_gpus=0.5, num_cpus=2))
    assert fixed.name == DEPLOYMENT
    assert fixed.num_replicas == 3
    assert fixed.ray_actor_options == {"num_gpus": 0.5, "num_cpus": 2}
    assert fixed.max_ongoing_requests == 32  # = max_streams: Serve queues instead of the replica's 429

    scaled = deployment_of(build_deployment(config(max_streams=32), replicas=4, autoscaling={}))
    autoscaling = scaled._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.target_ongoing_requests) == (1, 4, 16)
    custom = {"min_replicas": 2, "max_replicas": 8, "target_ongoing_requests": 5}
    scaled = deployment_of(build_deployment(config(), autoscaling=custom, max_ongoing_requests=10))
    autoscaling = scaled._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.target_ongoing_requests) == (2, 8, 5)
    assert scaled.max_ongoing_requests == 10

    # Serve's health check fails once the replica's engine is closed (Serve then replaces the replica).
    from integrations.gateway import Gateway

    gateway = Gateway(config())  # not started yet: no engine
    replica = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(gateway=gateway)))
    with pytest.raises(RuntimeError, match="engine"):
        fixed.func_or_class.check_health(replica)
    gateway.engine = SimpleNamespace(closed=False)
    fixed.func_or_class.check_health(replica)
    gateway.engine.closed = True
    with pytest.raises(RuntimeError, match="engine"):
        fixed.func_or_class.check_health(replica)

    # No GPU reserved: the guard runs on the CPU unless a device is chosen.
    assert replica_config(config(), 0).device == "cpu"
    assert replica_config(config(), 1).device is None
    assert replica_config(config(device="cuda:0"), 0).device == "cuda:0"

    with pytest.raises(ValueError, match="replicas"):
        build_deployment(config(), replicas=0)
    with pytest.raises(TypeError, match="GatewayConfig"):
        build_deployment({"upstream": "http://127.0.0.1:9/v1"})


def test_app_builder_takes_serve_run_arguments():
    """``serve run integrations.ray_serve:app_builder key=value``: every value a string."""
    pytest.importorskip("ray.serve")
    from integrations.ray_serve import app_builder

    application = app_builder(
        {"upstream": "http://127.0.0.1:9/v1", "generator": "llama3", "mode": "loose", "max_streams": "8",
         "fail_open": "false", "kv_budget_bytes": "none", "max_wait_ms": "1.5", "replicas": "2", "num_gpus": "0.25",
         "autoscaling": '{"max_replicas": 5}'}
    )  # fmt: skip
    deployment = deployment_of(application)
    assert deployment.max_ongoing_requests == 8
    assert deployment.ray_actor_options["num_gpus"] == 0.25
    assert deployment._deployment_config.autoscaling_config.max_replicas == 5
    # A config file's YAML values arrive typed.
    deployment = deployment_of(app_builder({"upstream": "http://127.0.0.1:9/v1", "replicas": 3, "fail_open": True}))
    assert deployment.num_replicas == 3
    with pytest.raises(ValueError, match="unknown argument"):
        app_builder({"upstream": "http://127.0.0.1:9/v1", "replica": 2})
    with pytest.raises(ValueError, match="max_streams"):
        app_builder({"upstream": "http://127.0.0.1:9/v1", "max_streams": "many"})


# --- on a local Ray cluster --------------------------------------------------------


def test_crossguard_serve_ray_runs_replicas_of_the_gateway(tmp_path):
    """``crossguard serve --ray --replicas 2`` as a process, on a Ray cluster of its own."""
    pytest.importorskip("ray.serve")
    import signal
    import subprocess

    import httpx

    from tests.upstream_server import UpstreamServer

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "integrations.cli", "serve", "--ray", "--replicas", "2", "--tiny",
               "--upstream", "<set below>", "--generator", "llama3", "--max-streams", str(MAX_STREAMS),
               "--port", str(port)]  # fmt: skip
    # RAY_ADDRESS=local: a new cluster, never one that runs on the machine.
    environment = {**os.environ, "RAY_ADDRESS": "local", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "serve.log"
    with UpstreamServer() as upstream, log.open("w") as output:
        command[command.index("<set below>")] = upstream.url
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=environment)
        try:
            seen: set[str] = set()

            def both_replicas_answer() -> bool:
                assert process.poll() is None, log.read_text()[-3000:]
                with contextlib.suppress(httpx.HTTPError):
                    response = httpx.get(f"{url}/health", timeout=2)
                    if response.status_code == 200:
                        seen.add(response.headers["x-crossguard-replica"])
                return len(seen) == 2

            wait_for(both_replicas_answer, STARTUP_S, "crossguard serve --ray with two replicas")
            streams = asyncio.run(streams_at_once(url, first_client=0, delay_ms=40))
            for client_id, stream in enumerate(streams):
                assert_judged(stream, client_id)
            assert {stream.replica for stream in streams} == seen
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait(timeout=10)
    assert process.returncode == 0, log.read_text()[-3000:]


@dataclass
class Cluster:
    url: str
    upstream: Any


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("ray.serve")
    import ray
    from ray import serve

    from integrations.ray_serve import build_deployment
    from tests.gateway_harness import write_gateway_guard
    from tests.upstream_server import UpstreamServer

    guard = write_gateway_guard(tmp_path_factory.mktemp("ray-guard"))
    saved = os.environ.get("RAY_USAGE_STATS_ENABLED")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # the replicas inherit it
    upstream = UpstreamServer().start()
    try:
        # "local": a new cluster of our own, never one found on the machine.
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        gateway = GatewayConfig(upstream=upstream.url, generator="llama3", guard=str(guard), max_streams=MAX_STREAMS)
        application = build_deployment(gateway, replicas=REPLICAS, num_cpus=1, health_check_period_s=1)
        serve.run(application, name=APP, route_prefix="/")  # returns once both replicas are up
        url = f"http://127.0.0.1:{port}"
        # Both replicas serve once (their first guard forwards are slow), then the tests time streams.
        asyncio.run(streams_at_once(url, first_client=1000, delay_ms=10))
        yield Cluster(url=url, upstream=upstream)
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            upstream.stop()
            if saved is None:
                os.environ.pop("RAY_USAGE_STATS_ENABLED", None)
            else:
                os.environ["RAY_USAGE_STATS_ENABLED"] = saved


def replica_tags() -> set[str]:
    """The replicas alive now (their actors are named after the replica tag)."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{DEPLOYMENT}#"
    names = ray.util.list_named_actors(all_namespaces=True)
    return {entry["name"][len(prefix) :] for entry in names if entry["name"].startswith(prefix)}


def running_replicas() -> int:
    from ray import serve

    application = serve.status().applications.get(APP)
    if application is None:
        return 0
    return application.deployments[DEPLOYMENT].replica_states.get("RUNNING", 0)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)


@dataclass
class Stream:
    """What one streaming client saw."""

    status: int | None = None
    replica: str | None = None
    content: str = ""
    finish_reasons: list[str] = field(default_factory=list)
    done: bool = False
    error: BaseException | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)  # the first content arrived


async def chat(
    client: Any, url: str, client_id: int, *, delay_ms: int, filler: int = 0, seen: Stream | None = None
) -> Stream:
    body = {"model": "tiny-llama3", "stream": True, "messages": PROMPT, "max_tokens": 400,
            "test_script": script(client_id, filler), "test_fail": {"delay_ms": delay_ms}}  # fmt: skip
    seen = Stream() if seen is None else seen
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            seen.status, seen.replica = response.status_code, response.headers.get("x-crossguard-replica")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    seen.done = True
                    continue
                for choice in json.loads(data).get("choices") or ():
                    seen.content += (choice.get("delta") or {}).get("content") or ""
                    if choice.get("finish_reason"):
                        seen.finish_reasons.append(choice["finish_reason"])
                if seen.content:
                    seen.started.set()
    except Exception as error:  # what the client saw is the result
        seen.error = error
    seen.started.set()
    return seen


def client(httpx: Any) -> Any:
    return httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_S, connect=10.0))


async def streams_at_once(url: str, *, first_client: int, delay_ms: int) -> list[Stream]:
    """CONCURRENT streams at once: more than one replica takes, so both serve."""
    import httpx

    async with client(httpx) as http:
        calls = [chat(http, url, first_client + i, delay_ms=delay_ms) for i in range(CONCURRENT)]
        return await asyncio.wait_for(asyncio.gather(*calls), REQUEST_S)


def assert_judged(stream: Stream, client_id: int, filler: int = 0) -> None:
    assert stream.error is None, repr(stream.error)
    assert stream.status == 200
    assert stream.content == judged(client_id, filler)
    assert stream.finish_reasons == ["content_filter"]
    assert stream.done


def test_streams_are_spread_over_the_replicas_and_each_gets_its_judged_prefix(cluster):
    import httpx

    health = httpx.get(f"{cluster.url}/health", timeout=REQUEST_S)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.headers["x-crossguard-replica"] in replica_tags()

    streams = asyncio.run(streams_at_once(cluster.url, first_client=0, delay_ms=40))
    for client_id, stream in enumerate(streams):
        assert_judged(stream, client_id)
    served = [stream.replica for stream in streams]
    assert set(served) == replica_tags() and len(set(served)) == REPLICAS, served
    assert max(served.count(tag) for tag in set(served)) <= MAX_STREAMS, served


def test_a_killed_replica_fails_its_streams_and_the_others_go_on(cluster):
    import httpx
    import ray

    wait_for(lambda: running_replicas() == REPLICAS and len(replica_tags()) == REPLICAS, STARTUP_S, "two replicas")
    before = replica_tags()
    killed: dict[str, str] = {}

    async def run() -> tuple[list[Stream], list[Stream]]:
        async with client(httpx) as http:
            # Long answers (the flagged text comes after about 6 s), in flight on both replicas
            # (at most MAX_STREAMS on one).
            first = [Stream() for _ in range(CONCURRENT - 2)]
            tasks = [chat(http, cluster.url, i, delay_ms=100, filler=LONG, seen=s) for i, s in enumerate(first)]
            running = asyncio.gather(*tasks)
            await asyncio.wait_for(asyncio.gather(*(stream.started.wait() for stream in first)), REQUEST_S)
            served = [stream.replica for stream in first]
            victim = killed["victim"] = max(before, key=served.count)
            ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#{DEPLOYMENT}#{victim}", namespace="serve"))
            # New streams right after the kill, as many as the surviving replica has room for.
            room = MAX_STREAMS - (len(served) - served.count(victim))
            after = asyncio.gather(*(chat(http, cluster.url, 100 + i, delay_ms=10) for i in range(room)))
            results = await asyncio.wait_for(asyncio.gather(running, after), REQUEST_S)
            return results[0], results[1]

    first, after = asyncio.run(run())
    victim = killed["victim"]
    (survivor,) = before - {victim}
    on_victim = [(i, s) for i, s in enumerate(first) if s.replica == victim]
    on_survivor = [(i, s) for i, s in enumerate(first) if s.replica != victim]
    assert on_victim and after
    for client_id, stream in on_victim:
        # Cut off: an error, never a clean end, and only text the guard judged.
        assert stream.error is not None, (client_id, stream)
        assert not stream.done and not stream.finish_reasons
        assert judged(client_id, LONG).startswith(stream.content), (client_id, stream.content)
    for client_id, stream in on_survivor:
        assert stream.replica == survivor
        assert_judged(stream, client_id, LONG)
    for offset, stream in enumerate(after):
        assert stream.replica == survivor  # at once, long before a new replica could start
        assert_judged(stream, 100 + offset)

    # Ray brings a new replica up in the killed one's place, and it serves.
    wait_for(lambda: running_replicas() == REPLICAS and len(replica_tags() - before) == 1, STARTUP_S, "a new replica")
    assert victim not in replica_tags()

    streams = asyncio.run(streams_at_once(cluster.url, first_client=200, delay_ms=40))
    for offset, stream in enumerate(streams):
        assert_judged(stream, 200 + offset)
    assert {stream.replica for stream in streams} == replica_tags()
