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
    assert [row["kind"] for row in rows] == ["token", "token", "flush"]


SHARED_KEYS = ("kind", "generator_token", "generator_id", "text", "start", "end")
VERDICT_KEYS = ("position", "risk_level", "risk_prob", "category", "category_prob", "unsafe", "flagged", "flagged_at")


def test_moderate_json_rows_always_carry_every_verdict_key_and_flagged_at(tmp_path, capsys):
    from adapter.bundled_tokenizers import qwen3_tokenizer, qwen3_tokenizer_path
    from adapter.retokenize import encode_ordinary
    from guard.testing import write_tiny_checkpoint

    folder = write_tiny_checkpoint(
        tmp_path / "guard",
        tokenizer_json=qwen3_tokenizer_path(),
        unsafe_token_ids=encode_ordinary(qwen3_tokenizer(), " dynamite"),
    )
    records = tmp_path / "chats.jsonl"
    # 128000 is Llama 3's <|begin_of_text|>: a token with no text before any guard token has no verdict.
    records.write_text(
        json.dumps({"prompt": "stumps?", "response_ids": [128000, 10464, 18003, 635, 18003, 635, 1457]}) + "\n"
    )
    assert main(["moderate", str(records), "--guard", str(folder), "--generator", "llama3", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tokens = [row for row in rows if row["kind"] == "token"]
    assert "".join(row["text"] for row in tokens) == "Use dynamite dynamite now"
    for row in rows:
        assert set(VERDICT_KEYS) <= row.keys()
    for row in tokens:
        assert set(SHARED_KEYS) <= row.keys() and "index" not in row
    assert [row["generator_id"] for row in tokens] == [128000, 10464, 18003, 635, 18003, 635, 1457]
    unjudged = tokens[0]
    assert unjudged["text"] == "" and all(unjudged[key] is None for key in VERDICT_KEYS)
    flagged = [row for row in tokens if row["flagged"]]
    assert flagged and all(row["flagged_at"] == flagged[0]["flagged_at"] is not None for row in flagged)
    assert all(row["flagged_at"] is None for row in tokens if not row["flagged"])


def test_bridge_and_moderate_name_the_same_things_the_same(tmp_path, capsys):
    text = "Hello there! 👋 x"
    bridge = [json.loads(line) for line in run("bridge", "--generator", "llama3", "--json", text).stdout.splitlines()]
    records = tmp_path / "one.jsonl"
    records.write_text(json.dumps({"prompt": "hi", "response": text}) + "\n")
    assert main(["moderate", str(records), "--tiny", "--generator", "llama3", "--json"]) == 0
    moderate = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    bridge_tokens = [{key: row[key] for key in SHARED_KEYS} for row in bridge if row["kind"] == "token"]
    moderate_tokens = [{key: row[key] for key in SHARED_KEYS} for row in moderate if row["kind"] == "token"]
    assert bridge_tokens == moderate_tokens
    assert bridge[-1]["kind"] == "flush" and bridge[-1]["generator_token"] is None
