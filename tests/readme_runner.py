"""Run README.md as a newcomer would, offline: python tests/readme_runner.py README.md

1. Cut the network off (``tests.offline``: a new network namespace with only
   loopback, else a socket guard) and check that it is cut.
2. Start the README's own gateway command (the ``crossguard serve ...
   --demo-upstream`` line of its bash blocks), as written, and wait for it.
3. Run every Python block, as written, top to bottom, in one namespace (one
   Python session: a block uses what earlier ones defined), the way Python's
   asyncio REPL runs code (top-level ``await`` works).

Prints one JSON line per step on standard output; exits 1 at the first block
that fails, naming its README line.
"""

from __future__ import annotations

import sys

from tests.offline import cut_network  # first: a user namespace needs a single-threaded process

HOW = cut_network()

import ast  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import faulthandler  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

from tests.offline import probe  # noqa: E402

GATEWAY_PORT = 8080  # where the README's gateway examples expect `crossguard serve`


def say(**fields) -> None:
    print(json.dumps(fields), flush=True)


def blocks(readme: str, language: str) -> list[tuple[int, str]]:
    """(line of the block's first code line, code) for every ```language block."""
    pattern = rf"^```{language}\n(.*?)^```"
    return [(readme[: match.start()].count("\n") + 2, match.group(1))
            for match in re.finditer(pattern, readme, flags=re.S | re.M)]  # fmt: skip


def gateway_command(readme: str) -> list[str]:
    """The README's line that starts the gateway in front of the demo upstream."""
    for _, code in blocks(readme, "bash"):
        for line in code.splitlines():
            if line.startswith("crossguard serve") and "--demo-upstream" in line:
                command = shlex.split(line, comments=True)
                # `crossguard` is the console script; without it on PATH, the same program.
                return command if shutil.which(command[0]) else [sys.executable, "-m", "crossguard", *command[1:]]
    raise SystemExit("README.md has no `crossguard serve ... --demo-upstream` line")


def wait_for_port(port: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the gateway exited with status {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise SystemExit(f"the gateway did not listen on port {port} within {timeout:.0f} s")


def run_blocks(readme: str) -> int:
    namespace: dict = {"__name__": "__main__"}
    loop = asyncio.new_event_loop()
    code_blocks = blocks(readme, "python")
    for line, code in code_blocks:
        start = time.monotonic()
        try:
            compiled = compile(code, f"README.md, block at line {line}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            result = eval(compiled, namespace)
            if inspect.iscoroutine(result):
                loop.run_until_complete(result)
        except BaseException:
            say(block=line, ok=False, error=traceback.format_exc())
            return 1
        say(block=line, ok=True, seconds=round(time.monotonic() - start, 2))
    say(blocks=len(code_blocks))
    loop.close()
    return 0


def main() -> int:
    readme = Path(sys.argv[1]).read_text(encoding="utf-8")
    say(network=HOW, probe=probe())
    faulthandler.dump_traceback_later(840, exit=True)  # a hang shows where it hangs
    with socket.socket() as taken:
        try:
            taken.bind(("127.0.0.1", GATEWAY_PORT))
        except OSError as error:
            taken_by = f"port {GATEWAY_PORT}, where the README's gateway examples connect, is taken"
            raise SystemExit(f"{taken_by}: {error}") from None
    command = gateway_command(readme)
    say(gateway=command)
    gateway = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(GATEWAY_PORT, gateway, timeout=180)
        return run_blocks(readme)
    finally:
        gateway.send_signal(signal.SIGINT)
        try:
            output, _ = gateway.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            gateway.kill()
            output, _ = gateway.communicate()
        say(gateway_exit=gateway.returncode, gateway_output=output[-4000:])


if __name__ == "__main__":
    sys.exit(main())
