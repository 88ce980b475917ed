"""The crossguard command line, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

from integrations.cli import main


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "integrations.cli", *args], input=stdin, capture_output=True, text=True, timeout=300
    )


def test_demo_runs_the_pipeline_and_says_its_verdicts_are_meaningless():
    result = run("demo", "--color", "never")
    assert result.returncode == 0, result.stderr
    assert "MEANINGLESS" in result.stdout
    assert "FLAGGED at generator token" in result.stdout  # the wired-in unsafe word
    assert "<|im_end|> is just text." in result.stdout


def test_moderate_jsonl_prints_one_json_line_per_generator_token(tmp_path, capsys):
    records = tmp_path / "chats.jsonl"
    records.write_text(
        json.dumps({"prompt": "hi", "response": "Hello there! 👋"}) + "\n"
        + json.dumps({"prompt": [{"role": "user", "content": "hi"}], "response_ids": [9906, 1070]}) + "\n"
    )  # fmt: skip
    assert main(["moderate", str(records), "--tiny", "--generator", "llama3", "--json"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert "MEANINGLESS" in captured.err
    assert [row["kind"] for row in rows if row["line"] == 2] == ["query", "token", "token"]
    first = [row for row in rows if row["line"] == 1 and row["kind"] == "token"]
    assert "".join(row["text"] for row in first) == "Hello there! 👋"
    assert all(row["risk_level"] in ("Safe", "Unsafe", "Controversial") for row in first)


def test_default_guard_offline_says_what_to_do(tmp_path):
    records = tmp_path / "one.jsonl"
    records.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    env_result = subprocess.run(
        [sys.executable, "-m", "integrations.cli", "moderate", str(records)],
        capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    assert env_result.returncode != 0
    assert "Qwen/Qwen3Guard-Stream-0.6B" in env_result.stderr
    assert "--tiny" in env_result.stderr and "pass the path" in env_result.stderr


def test_bridge_json():
    result = run("bridge", "--generator", "llama3", "--json", "Hello world")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["qwen_ids"] for row in rows] == [[], [9707], [1879]]
