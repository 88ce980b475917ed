"""What the gateway tests, the Ray Serve tests and the gateway benchmark share:
a tiny guard wired to flag known text, an ASGI app served by a real uvicorn
on 127.0.0.1 in a background thread, an upstream that writes the bytes a test
gives it, and ``crossguard serve`` run as a process."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from adapter.bundled_tokenizers import qwen3_tokenizer, qwen3_tokenizer_path
from adapter.retokenize import encode_ordinary
from guard.testing import write_tiny_checkpoint

#: The tiny guard calls every guard token of this Unsafe in an answer (two
#: in a row flag it), and a prompt holding this Unsafe.
UNSAFE_ANSWER = " dynamite"
UNSAFE_PROMPT = " bomb"


def write_gateway_guard(folder: str | Path) -> Path:
    """A tiny random guard that flags answers saying " dynamite" and refuses
    prompts saying " bomb" (every other text is Safe)."""
    tokenizer = qwen3_tokenizer()
    return write_tiny_checkpoint(
        folder, tokenizer_json=qwen3_tokenizer_path(), unsafe_token_ids=encode_ordinary(tokenizer, UNSAFE_ANSWER),
        unsafe_prompt_token_ids=encode_ordinary(tokenizer, UNSAFE_PROMPT),
    )  # fmt: skip


def metric(server: Any, name: str) -> float:
    """A sample of the gateway's /metrics (``server.url``)."""
    import re

    import httpx

    text = httpx.get(server.url + "/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def wait_for(predicate: Any, timeout: float = 10.0) -> bool:
    """Whether ``predicate()`` came true within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


class AppServer:
    """Serve an ASGI app with uvicorn (lifespan on) on a free loopback port."""

    def __init__(self, app: Any, *, startup_timeout: float = 60.0) -> None:
        self.app, self.startup_timeout = app, startup_timeout
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> AppServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_config=None, log_level="warning", access_log=False, lifespan="on",
                                timeout_graceful_shutdown=2, loop="asyncio", ws="none")  # fmt: skip
        self._server = server = uvicorn.Server(config)
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name=f"app-{self.port}")  # fmt: skip
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not server.started:
            self.stop()
            raise RuntimeError("the app did not start")
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(5)
        self._server = self._thread = None

    def __enter__(self) -> AppServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --- an upstream written byte by byte ---------------------------------------------------


class RawUpstream:
    """An upstream that writes exactly the bytes a test gives it: an asyncio
    TCP server on 127.0.0.1 in a background thread, no HTTP library in
    between. Each request's JSON body says what to answer (the gateway
    forwards a request's extra fields, so tests put them in ``extra_body``):

    ``"raw": "<latin-1 text>"``
        these bytes (status line, headers, body), then the connection closes;
    ``"raw_parts": [...]``, ``"pace_ms": x``
        each part in turn, ``x`` ms apart (``"hold": true`` keeps the
        connection open afterwards, until the gateway closes it);
    ``"forever": "<latin-1 text>"`` (after ``"raw"``)
        these bytes again and again, as fast as the gateway takes them,
        until it closes the connection.

    ``requests``: (method, target, headers, body bytes) of every request;
    ``connections``: per connection, whether the gateway has closed it."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.connections: list[dict[str, Any]] = []
        self._loop: Any = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> RawUpstream:
        import asyncio

        ready = threading.Event()

        async def main() -> None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            async with self._server:
                await self._server.serve_forever()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                self._loop.run_until_complete(main())

        self._thread = threading.Thread(target=run, name="raw-upstream", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
            for task in list(self._tasks()):
                self._loop.call_soon_threadsafe(task.cancel)
        if self._thread is not None:
            self._thread.join(5)

    def _tasks(self) -> list:
        import asyncio

        return [task for task in asyncio.all_tasks(self._loop) if task.get_name().startswith("raw-connection")]

    def __enter__(self) -> RawUpstream:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def wait_closed(self, number: int, timeout: float = 10.0) -> bool:
        """Whether the gateway closed connection ``number`` (-1: the last) within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.connections and self.connections[number]["closed"]:
                return True
            time.sleep(0.02)
        return bool(self.connections and self.connections[number]["closed"])

    async def _serve(self, reader: Any, writer: Any) -> None:
        import asyncio
        import json

        asyncio.current_task().set_name(f"raw-connection-{len(self.connections)}")
        record = {"closed": False, "request": None}
        self.connections.append(record)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests.append((method, target, headers, body))
            record["request"] = self.requests[-1]
            order = json.loads(body) if body and headers.get("content-type", "").startswith("application/json") else {}
            watcher = asyncio.ensure_future(self._watch(reader, record))
            parts = [order.get("raw", "")] if "raw" in order else list(order.get("raw_parts", ()))
            if not parts and "forever" not in order:
                parts = ["HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"]
            pace = float(order.get("pace_ms", 0)) / 1000
            for part in parts:
                writer.write(part.encode("latin-1"))
                await writer.drain()
                if pace:
                    await asyncio.sleep(pace)
            if "forever" in order:
                again = order["forever"].encode("latin-1")
                while not record["closed"]:
                    writer.write(again)
                    await writer.drain()
            if order.get("hold"):
                await watcher
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    @staticmethod
    async def _watch(reader: Any, record: dict[str, Any]) -> None:
        """Mark the connection closed when the gateway closes its end."""
        with contextlib.suppress(Exception):
            while await reader.read(65536):
                pass
        record["closed"] = True


def http_response(body: bytes | str, *, status: str = "200 OK", content_type: str = "text/event-stream",
                  headers: str = "") -> str:  # fmt: skip
    """A whole HTTP/1.1 response, read until the connection closes (latin-1 text, as ``RawUpstream`` takes it)."""
    if isinstance(body, str):
        body = body.encode("utf-8")
    return (f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\nconnection: close\r\n{headers}\r\n"
            + body.decode("latin-1"))  # fmt: skip


def sse_body(events: list[Any], *, line_end: str = "\n", done: bool = True) -> str:
    """Events as an SSE body: a dict becomes its JSON on a ``data:`` line; a str is written as it is."""
    import json

    out = []
    for event in events:
        out.append(event if isinstance(event, str) else "data: " + json.dumps(event) + line_end + line_end)
    if done:
        out.append("data: [DONE]" + line_end + line_end)
    return "".join(out)


# --- crossguard serve, as a process ------------------------------------------------------


class CliGateway:
    """``crossguard serve --tiny`` in its own process (the real command line),
    on a free port; its output (uvicorn's access log included) is kept."""

    def __init__(self, upstream: str, *arguments: str, environment: dict[str, str] | None = None) -> None:
        import os
        import sys
        import tempfile

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "integrations.cli", "serve", "--upstream", upstream, "--tiny",
                   "--port", str(self.port), *arguments]  # fmt: skip
        self._log = tempfile.TemporaryFile(mode="w+")
        import subprocess

        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, "OMP_NUM_THREADS": "1", **(environment or {})})  # fmt: skip

    def wait_ready(self, timeout: float = 120.0) -> CliGateway:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"crossguard serve exited: {self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"crossguard serve did not come up: {self.output()}")

    def output(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def stop(self) -> int:
        import signal

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except Exception:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode
