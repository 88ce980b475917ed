"""What the gateway tests, the Ray Serve tests and the gateway benchmark share:
a tiny guard wired to flag known text, and an ASGI app served by a real
uvicorn on 127.0.0.1 in a background thread."""

from __future__ import annotations

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
