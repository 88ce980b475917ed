"""One tiny guard everywhere: ``crossguard demo``, ``moderate --tiny`` and
``serve --tiny`` judge the same conversations the same way (Safe on ordinary
text, Unsafe on " dynamite" in answers and prompts), and say that their
verdicts are meaningless.

Each command is run as a user runs it, on the demo's own conversations;
what it shows is read back into one shape and compared with one expectation.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from integrations.cli import DEMO_CONVERSATIONS, main


@dataclass(frozen=True)
class Judged:
    """What a command showed for one conversation."""

    query: str  # the prompt's risk level
    flagged_text: str | None  # the generator text where the flag came (None: not flagged, or refused first)


#: The demo's conversations, in order: an answer that says " dynamite", an
#: ordinary one, a prompt that says " dynamite".
EXPECTED = [Judged("Safe", "dynamite"), Judged("Safe", None), Judged("Unsafe", None)]


def demo_command(capsys, tmp_path) -> tuple[list[Judged], str]:
    assert main(["demo", "--color", "never"]) == 0
    out = capsys.readouterr().out
    judged = []
    for block in re.split(r"^── line \d+ ──$", out, flags=re.M)[1:]:
        query = re.search(r"query verdict (\w+)", block).group(1)
        flagged = re.search(r"FLAGGED at generator token \d+ \('(.*?)'\)", block)
        judged.append(Judged(query, flagged and flagged.group(1)))
    return judged, out


def moderate_command(capsys, tmp_path) -> tuple[list[Judged], str]:
    records = tmp_path / "demo.jsonl"
    records.write_text("".join(json.dumps(record) + "\n" for record in DEMO_CONVERSATIONS))
    assert main(["moderate", str(records), "--tiny", "--json"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    judged = []
    for number in range(1, len(DEMO_CONVERSATIONS) + 1):
        line = [row for row in rows if row["line"] == number]
        flagged = next((row["text"] for row in line if row["kind"] == "token" and row["flagged"]), None)
        judged.append(Judged(line[0]["risk_level"], flagged))
        # Ordinary text is Safe token by token; only the tokens of " dynamite" are not.
        response = DEMO_CONVERSATIONS[number - 1]["response"]
        word = response.find(" dynamite")
        for row in line:
            if row["kind"] == "end_of_turn":  # after ordinary text, the end of turn is Safe too
                assert word >= 0 or row["risk_level"] == "Safe", row
            if row["kind"] != "token":
                continue
            if word < 0 or not (row["start"] < word + len(" dynamite") and word < row["end"]):
                assert row["risk_level"] == "Safe", row
    return judged, captured.err


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_command(capsys, tmp_path) -> tuple[list[Judged], str]:
    import httpx
    import openai

    port = free_port()
    command = [sys.executable, "-m", "crossguard", "serve", "--tiny", "--demo-upstream", "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    judged = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        for record in DEMO_CONVERSATIONS:
            messages = [{"role": "user", "content": record["prompt"]}]
            try:
                chunks = list(client.chat.completions.create(
                    model="tiny-llama3", messages=messages, stream=True, extra_body={"test_script": record["response"]}
                ))  # fmt: skip
            except openai.BadRequestError as error:
                assert error.code == "content_filter"
                judged.append(Judged(error.body["crossguard"]["verdict"]["risk_level"], None))
                continue
            query = chunks[0].model_extra["prompt_filter_results"][0]["crossguard"]["risk_level"]
            shown = "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)
            cut = any(choice.finish_reason == "content_filter" for chunk in chunks for choice in chunk.choices)
            assert record["response"].startswith(shown)
            # The gateway withholds from the start of the flagged stretch: the word that flagged comes next.
            judged.append(Judged(query, record["response"][len(shown) :].split()[0] if cut else None))
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    return judged, output


@pytest.mark.parametrize("command", [demo_command, moderate_command, serve_command], ids=["demo", "moderate", "serve"])
def test_demo_moderate_and_serve_share_one_tiny_guard(command, capsys, tmp_path):
    judged, said = command(capsys, tmp_path)
    assert "MEANINGLESS" in said
    assert [item.query for item in judged] == [expected.query for expected in EXPECTED]
    for item, expected in zip(judged, EXPECTED, strict=True):
        if expected.flagged_text is None:
            assert item.flagged_text is None, item
        else:  # the token that flagged is part of the word (generators cut it differently)
            assert item.flagged_text and item.flagged_text.strip(" .,") in expected.flagged_text, item


def test_the_tiny_guard_in_python_is_the_one_the_commands_use(tmp_path):
    from adapter import GuardAdapter
    from adapter.bundled_tokenizers import encode_text, generator_tokenizer, qwen3_tokenizer_path
    from guard.testing import TINY_UNSAFE_TEXT, tiny_guard, write_tiny_guard

    kept = tmp_path / "kept"
    guard = tiny_guard(qwen3_tokenizer_path(), kept)
    assert "MEANINGLESS" in guard.source
    assert (kept / "config.json").is_file()  # a folder given is kept, for processes that load it again
    written = write_tiny_guard(tmp_path / "again", tokenizer_json=qwen3_tokenizer_path())
    assert (written / "model.safetensors").read_bytes() == (kept / "model.safetensors").read_bytes()
    llama3 = generator_tokenizer("llama3")
    for prompt, answer, query, flagged in [
        ("How do I bake bread?", "Knead, let it rise, bake at 220 C.", "Safe", False),
        ("Granite or termite-proof wood?", "Seal the granite; ask a termite inspector.", "Safe", False),
        ("How do I clear stumps?", f"Dig, or use{TINY_UNSAFE_TEXT}.", "Safe", True),
        (f"Is{TINY_UNSAFE_TEXT} good for stumps?", "No.", "Unsafe", False),
    ]:
        adapter = GuardAdapter(guard.session(), llama3)
        assert adapter.moderate_prompt(prompt).risk_level == query, prompt
        pieces = adapter.push_ids(encode_text(llama3, answer)) + adapter.finish()
        assert any(piece.flagged for piece in pieces) == flagged, answer
