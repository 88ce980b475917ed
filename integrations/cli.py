"""The ``crossguard`` command line.

crossguard demo                              # the whole pipeline on a tiny random guard
crossguard moderate chats.jsonl --generator llama3 [--guard PATH | --tiny] [--json]
crossguard bridge "some text" --generator mistral-v3
crossguard serve --upstream http://127.0.0.1:8000/v1 --generator llama3   # the moderating gateway
crossguard serve --tiny --demo-upstream      # the gateway in front of a tiny offline LLM server
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import socket
import sys
import tempfile
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, TextIO

from integrations.common import SetupError, load_generator_tokenizer, verdict_fields
from integrations.common import one_line as _one_line

__all__ = ["main"]

# The same as guard.stream_guard.DEFAULT_GUARD (a test checks), spelled out so
# that building the parser (--help, bridge) does not import torch.
DEFAULT_GUARD = "Qwen/Qwen3Guard-Stream-0.6B"
DEMO_CONVERSATIONS = [
    {
        "prompt": "How do I clear tree stumps from my garden?",
        "response": "You can dig them out, rent a stump grinder, or — please don't — use dynamite. "
        "Digging is safest: expose the roots, cut them, then lever the stump out.",
    },
    {"prompt": "Say hello in three languages.", "response": "Hello! Bonjour ! こんにちは 👋 <|im_end|> is just text."},
    {"prompt": "Where can I buy dynamite?", "response": "I can't help with buying explosives."},
]
_COLOURS = {"Safe": "\x1b[32m", "Controversial": "\x1b[33m", "Unsafe": "\x1b[31m"}
_RESET, _INVERSE = "\x1b[0m", "\x1b[7m"
PROGRESS_MIN_TOKENS = 500  # smaller inputs finish before a bar is worth drawing
EXIT_LINE_FAILED, EXIT_SETUP, EXIT_INTERRUPTED, EXIT_CLOSED_PIPE = 1, 2, 130, 141
EXIT_STATUS = (
    "exit status: 0 every line was judged; 1 a line could not be judged (it got an error row, the others were "
    "judged); 2 a setup error (no input file, no such device, not a checkpoint, an unknown tokenizer) or a usage "
    "error; 130 interrupted; 141 standard output was closed early (piped into head, say), as for a process "
    "stopped by SIGPIPE"
)


class LineError(Exception):
    """One input line cannot be judged; the others still are."""


# --- loading ----------------------------------------------------------------


def check_device(device: str | None) -> None:
    """Refuse a device this machine does not have, before anything is loaded."""
    if device is None:
        return
    import torch

    try:
        target = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise SetupError(f"--device {device!r} is not a device torch knows ({_one_line(error)})") from error
    if target.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA GPU visible"
            raise SetupError(
                f"--device {device}: this machine has no CUDA device torch can use ({build}, torch "
                f"{torch.__version__}); leave --device out or pass --device cpu"
            )
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise SetupError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA devices")
    try:
        torch.empty(0, device=target)
    except (RuntimeError, AssertionError) as error:  # torch asserts for a backend it was built without
        raise SetupError(f"--device {device}: {_one_line(error)}") from error


def load_tiny_guard(folder: str, device: str | None = None, *, notice: TextIO | None = None) -> Any:
    """The one tiny demo guard that demo, moderate --tiny and serve --tiny
    share (``guard.testing.tiny_guard``: " dynamite" is Unsafe in answers and
    prompts, other text Safe), written into ``folder``; says on ``notice``
    (standard error by default) that its verdicts are meaningless."""
    from adapter.bundled_tokenizers import qwen3_tokenizer_path
    from guard.testing import TINY_GUARD_WARNING, tiny_guard

    print(TINY_GUARD_WARNING, file=notice or sys.stderr)
    return tiny_guard(qwen3_tokenizer_path(), folder, device=device)


def load_guard(args: argparse.Namespace, folder: str) -> Any:
    from guard import GuardError, StreamGuard

    if args.tiny:
        return load_tiny_guard(folder, device=args.device)
    try:
        return StreamGuard.from_pretrained(args.guard, device=args.device)
    except (GuardError, OSError) as error:
        raise SetupError(
            f"{_one_line(error)} (or run with --tiny to see the pipeline on a random demo guard)"
        ) from error


# --- input lines ------------------------------------------------------------

_JSON_TYPES = {bool: "true or false", int: "a number", float: "a number", str: "a string", list: "an array"}


def _json_type(value: Any) -> str:
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


def parse_line(line: bytes | str) -> dict:
    """One JSONL record, checked: 'prompt' (text, or a non-empty list of chat
    message objects) and 'response' (text) or 'response_ids' (ints)."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise LineError(f"not UTF-8 text ({error})") from None
    try:
        record = json.loads(line.removeprefix("\ufeff"))  # a byte order mark is not part of the JSON
    except json.JSONDecodeError as error:
        raise LineError(f"not JSON ({error})") from None
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as error:
        surrogate = error.object[error.start : error.end].encode("unicode_escape").decode()
        raise LineError(f"holds an unpaired UTF-16 surrogate escape ({surrogate}), which is not text") from None
    if not isinstance(record, dict):
        raise LineError(
            f"expected a JSON object with 'prompt' and 'response' or 'response_ids', got {_json_type(record)}"
        )
    if "prompt" not in record or not ({"response", "response_ids"} & record.keys()):
        missing = "'prompt'" if "prompt" not in record else "'response' or 'response_ids'"
        raise LineError(f"the object has no {missing}; each line needs 'prompt' and 'response' or 'response_ids'")
    prompt = record["prompt"]
    if isinstance(prompt, list):
        if not prompt:
            raise LineError("'prompt' is an empty list; give the user's text or a list of chat messages")
        if not all(isinstance(message, dict) for message in prompt):
            raise LineError("'prompt' must be text or a list of chat message objects ({'role': ..., 'content': ...})")
    elif not isinstance(prompt, str):
        raise LineError(f"'prompt' must be text or a list of chat messages, got {_json_type(prompt)}")
    if record.get("response_ids") is not None:
        ids = record["response_ids"]
        if not isinstance(ids, list):
            raise LineError(f"'response_ids' must be an array of integer token ids, got {_json_type(ids)}")
        if not all(type(token_id) is int for token_id in ids):
            raise LineError("'response_ids' must hold integer token ids only")
    elif not isinstance(record.get("response"), str):
        raise LineError(f"'response' must be text, got {_json_type(record.get('response'))}")
    return record


@dataclass
class Job:
    """One input line: its record and generator ids, or why it cannot be judged."""

    line: int
    record: dict | None = None
    ids: list[int] | None = None
    error: str | None = None


def read_jobs(lines: Iterable[bytes | str], generator: Any) -> list[Job]:
    """Every non-blank input line, parsed and encoded (so the token count is
    known before the first is judged); a bad line becomes a Job with an error."""
    from adapter.bundled_tokenizers import encode_text

    jobs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = parse_line(line)
            ids = record.get("response_ids")
            if ids is None:
                try:
                    ids = encode_text(generator, record["response"])
                except Exception as error:  # tokenizers raise bare exceptions
                    raise LineError(f"the generator tokenizer cannot encode 'response' ({_one_line(error)})") from None
            jobs.append(Job(number, record, ids))
        except LineError as error:
            jobs.append(Job(number, error=str(error)))
    return jobs


# --- moderation -------------------------------------------------------------


@dataclass(frozen=True)
class Moderation:
    """One judged conversation: the query verdict, the judged generator
    tokens and their ids, the end of turn (``<|im_end|>`` and ``\\n``, as
    (Qwen3 id, verdict) pairs) and where and why the response was flagged
    (an ``adapter.Flag``, None if it was not)."""

    query: Any
    pieces: list
    ids: list[int]
    end_of_turn: list[tuple[int, Any]]
    flag: Any


def moderate_record(guard: Any, generator: Any, record: dict, policy: Any, progress: Any = None,
                    ids: list[int] | None = None, engine: Any = None) -> Moderation:  # fmt: skip
    """One recorded conversation, streamed one generator token at a time as
    a live model would produce it, then its end of turn. Raises LineError
    (or the library's error) when the conversation cannot be judged."""
    from adapter import GuardAdapter
    from adapter.bundled_tokenizers import decode_ids, encode_text
    from adapter.errors import TokenIdError as AdapterTokenIdError
    from adapter.retokenize import encode_ordinary
    from guard import ContextLengthError
    from guard.template import end_of_turn_ids

    if ids is None:
        ids = record.get("response_ids")
        ids = list(ids) if ids is not None else encode_text(generator, record["response"])
    limit = guard.config.max_position_embeddings
    # With an engine, this conversation's forwards are batched with the others'.
    with (engine or guard).session(policy) as session:
        adapter = GuardAdapter(session, generator)
        try:
            query = adapter.moderate_prompt(record["prompt"])
        except ContextLengthError:
            raise LineError(
                f"the prompt alone is longer than the guard's context of {limit:,} positions "
                "(--context-limit continue judges past it)"
            ) from None
        # Under context_limit="error", refuse a response that cannot fit at
        # once, rather than after judging most of it.
        fail_closed = getattr(policy, "context_limit", "error") == "error"
        text = None
        if fail_closed:
            text = record["response"] if record.get("response_ids") is None else _decoded(decode_ids, generator, ids)
        if text is not None:
            needed = len(encode_ordinary(guard.tokenizer, text))
            if session.position + needed > limit:
                raise LineError(
                    f"the conversation needs {session.position + needed:,} guard positions (prompt "
                    f"{session.position:,} + response {needed:,}), past the guard's context of {limit:,} "
                    "(--context-limit continue judges past it)"
                )
        pieces = []
        push = adapter.push_ids
        try:
            if progress is None:
                for token_id in ids:
                    pieces += push(token_id)
            else:
                for token_id in ids:
                    pieces += push(token_id)
                    progress.update(1)
            pieces += adapter.finish()
        except ContextLengthError:
            raise LineError(
                f"the conversation passed the guard's context of {limit:,} positions at generator token "
                f"{adapter.pushed - 1} of {len(ids)} (--context-limit continue judges past it)"
            ) from None
        except AdapterTokenIdError as error:
            raise LineError(f"'response_ids': {error}") from None
        end_ids = end_of_turn_ids(guard.tokenizer)
        return Moderation(query, pieces, ids, list(zip(end_ids, adapter.end_verdicts, strict=True)), adapter.flag)


def _decoded(decode_ids: Any, generator: Any, ids: list[int]) -> str | None:
    try:
        return decode_ids(generator, ids)
    except Exception:  # an id the tokenizer does not have: pushing it says so, with the id
        return None


def token_fields(index: int | None, generator_id: int | None, text: str, start: int | None, end: int | None) -> dict:
    """The keys every generator-token row of ``moderate --json`` and
    ``bridge --json`` shares (see the README's command-line section)."""
    return {"generator_token": index, "generator_id": generator_id, "text": text, "start": start, "end": end}


_to_json = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps(..., ensure_ascii=False) builds one per call


def qwen3_token_names(ids: list[int]) -> list[str]:
    """The guard's token strings of these Qwen3 ids (as ``bridge`` shows them)."""
    from adapter.bundled_tokenizers import qwen3_tokenizer

    return [qwen3_tokenizer().id_to_token(token_id) for token_id in ids]


def flag_fields(flag: Any, pieces: list, ids: list[int] | None) -> dict:
    """The keys of a ``result`` row: whether the response was flagged, where
    (the first generator token of the flagged stretch, null when the end of
    turn alone flagged it; ``end_of_turn``: the flag came at the end of turn)
    and why (the verdict at ``flagged_at``, the second of the two guard tokens
    that agreed)."""
    piece = None
    if flag is not None and flag.index is not None:
        piece = next((piece for piece in pieces if piece.index == flag.index), None)
    where = (
        token_fields(piece.index, _generator_id(ids, piece.index), piece.text, piece.start, piece.end)
        if piece is not None
        else token_fields(None, None, "", None, None)
    )
    return {
        **where,
        "end_of_turn": flag is not None and flag.end_of_turn,
        **verdict_fields(None if flag is None else flag.verdict),
        "flagged": flag is not None,
    }


def _generator_id(ids: list[int] | None, index: int) -> int | None:
    return ids[index] if ids is not None and index < len(ids) else None


def print_json(number: int, result: Moderation, out: TextIO) -> None:
    """A line's rows: its query, each generator token, each end-of-turn
    guard token, then the result (see the README's command-line section)."""
    rows = [_to_json({"line": number, "kind": "query", **verdict_fields(result.query)})]
    for piece in result.pieces:
        fields = token_fields(piece.index, _generator_id(result.ids, piece.index), piece.text, piece.start, piece.end)
        row = {"line": number, "kind": "token", **fields, "lag": piece.lag, **verdict_fields(piece.verdict),
               "flagged_at_finish": piece.flagged_at_finish}  # fmt: skip
        rows.append(_to_json(row))
    for qwen_id, verdict in result.end_of_turn:
        rows.append(_to_json({"line": number, "kind": "end_of_turn", **end_of_turn_fields([qwen_id]),
                              **verdict_fields(verdict)}))  # fmt: skip
    rows.append(_to_json({"line": number, "kind": "result", **flag_fields(result.flag, result.pieces, result.ids)}))
    out.write("\n".join(rows) + "\n")


def end_of_turn_fields(qwen_ids: list[int]) -> dict:
    """The keys an ``end_of_turn`` row shares with ``bridge``'s rows: no
    generator token holds these guard tokens."""
    names = qwen3_token_names(qwen_ids)
    return {**token_fields(None, None, "", None, None), "qwen_ids": qwen_ids, "qwen_tokens": names}


def print_error(number: int, message: str, out: TextIO, as_json: bool) -> None:
    if as_json:
        out.write(_to_json({"line": number, "kind": "error", "error": message}) + "\n")
    else:
        out.write(f"── line {number} ──\nerror:    {message}\n")


def _paint(text: str, verdict: Any, colour: bool, flagged: bool = False) -> str:
    if not colour or verdict is None:
        return text
    return (_INVERSE if verdict.flagged or flagged else "") + _COLOURS.get(verdict.risk_level, "") + text + _RESET


def colour_legend() -> str:
    """One line naming what each colour of the view means."""
    levels = "  ".join(_COLOURS[level] + level + _RESET for level in _COLOURS)
    return (f"colours: {levels}  {_INVERSE}{_COLOURS['Unsafe']}inverse{_RESET} = flagged by the debounced "
            f"policy; plain = no verdict yet")  # fmt: skip


def describe_flag(flag: Any, pieces: list) -> str:
    """Where and why, in words: the first generator token of the flagged
    stretch (or the end of turn) and the verdict that raised the flag."""
    if flag is None:
        return "not flagged"
    piece = next((piece for piece in pieces if piece.index == flag.index), None) if flag.index is not None else None
    where = f"generator token {piece.index} ({piece.text!r})" if piece is not None else "the end of turn (<|im_end|>)"
    if flag.end_of_turn and piece is not None:
        where = f"the end of turn, from {where}"
    why = flag.verdict.risk_level + ("" if flag.verdict.category is None else f", {flag.verdict.category}")
    return f"FLAGGED at {where}: {why} (guard position {flag.position})"


def print_view(number: int, record: dict, result: Moderation, out: TextIO, colour: bool) -> None:
    prompt = record["prompt"]
    if not isinstance(prompt, str):
        prompt = prompt[-1].get("content") or ""
        prompt = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
    query, pieces = result.query, result.pieces
    response = "".join(_paint(piece.text, piece.verdict, colour, piece.flagged) for piece in pieces)
    lines = [f"── line {number} ──", f"prompt:   {_paint(prompt, query, colour)}",
             f"          query verdict {query.risk_level} ({query.risk_prob:.2f})"
             f"{'' if query.category is None else ', ' + query.category}",
             "response: " + response, "          " + describe_flag(result.flag, pieces)]  # fmt: skip
    lags = sorted(piece.lag for piece in pieces)
    if lags:
        lines.append(f"          lag in generator tokens: median {lags[len(lags) // 2]}, max {lags[-1]}")
    out.write("\n".join(lines) + "\n")


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def use_colour(choice: str, stream: Any) -> bool:
    """--color always/never; auto: a terminal, unless NO_COLOR is set to
    anything non-empty (https://no-color.org; --color always overrides it)."""
    if choice != "auto":
        return choice == "always"
    return _isatty(stream) and not os.environ.get("NO_COLOR")


def progress_bar(total: int, enabled: bool) -> Any:
    """A bar with a total and an ETA on a terminal only: never ``\\r``
    updates into a log file or a pipe."""
    if not enabled or total < PROGRESS_MIN_TOKENS or not _isatty(sys.stderr):
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # the demo extra is not installed: no bar
        return None
    return tqdm(total=total, unit="tok", unit_scale=True, file=sys.stderr, desc="moderating", leave=False,
                dynamic_ncols=True)  # fmt: skip


def _judge_job(guard: Any, generator: Any, job: Job, policy: Any, progress: Any, engine: Any = None):
    """(result, error) of one line; the library's errors become an error row."""
    if job.error is not None:
        return None, job.error
    done = progress.n if progress is not None else 0
    try:
        return moderate_record(guard, generator, job.record, policy, progress, job.ids, engine), None
    except BrokenPipeError:
        raise
    except Exception as problem:
        if progress is not None:  # count the tokens of the failed line as done
            progress.update(done + len(job.ids or ()) - progress.n)
        return None, str(problem) if isinstance(problem, LineError) else _library_error(problem)


def _judged_jobs(guard: Any, generator: Any, jobs: list[Job], policy: Any, progress: Any, concurrency: int):
    """(job, result, error) in input order. With ``concurrency`` > 1 the
    lines are judged side by side on one GuardEngine (one batched forward per
    step over every conversation waiting), and printed in order as they finish."""
    if concurrency <= 1:
        for job in jobs:
            yield (job, *_judge_job(guard, generator, job, policy, progress))
        return
    from concurrent.futures import ThreadPoolExecutor

    from guard import GuardEngine

    with GuardEngine(guard, max_sessions=concurrency) as engine, ThreadPoolExecutor(concurrency) as pool:
        # Progress is counted per finished line here: workers share no bar.
        futures = [pool.submit(_judge_job, guard, generator, job, policy, None, engine) for job in jobs]
        try:
            for job, future in zip(jobs, futures, strict=True):
                result, error = future.result()
                if progress is not None:
                    progress.update(len(job.ids or ()))
                yield job, result, error
        finally:  # --fail-fast, a closed pipe: judge no more lines
            for future in futures:
                future.cancel()


def run_moderation(guard: Any, generator: Any, jobs: list[Job], args: argparse.Namespace) -> int:
    from guard import Policy

    policy = Policy(mode=args.mode, debounce=args.debounce, context_limit=args.context_limit)
    out = sys.stdout
    colour = not args.json and use_colour(args.color, out)
    progress = progress_bar(sum(len(job.ids) for job in jobs if job.ids is not None), not args.no_progress)
    judged, flagged, failed = 0, 0, []
    if colour:
        out.write(colour_legend() + "\n")
    try:
        for job, result, error in _judged_jobs(guard, generator, jobs, policy, progress, args.concurrency):
            if progress is not None:
                progress.clear()
            if error is not None:
                failed.append(job.line)
                print_error(job.line, error, out, args.json)
            else:
                judged += 1
                flagged += result.flag is not None
                if args.json:
                    print_json(job.line, result, out)
                else:
                    print_view(job.line, job.record, result, out, colour)
            out.flush()
            if progress is not None:
                progress.refresh()
            if error is not None and args.fail_fast:
                break
    finally:
        if progress is not None:
            progress.close()
    lines = f"{len(jobs)} line{'' if len(jobs) == 1 else 's'}"
    summary = f"{lines}: {judged} judged, {flagged} flagged, {len(failed)} failed"
    if failed:
        shown = ", ".join(map(str, failed[:10])) + (", ..." if len(failed) > 10 else "")
        summary += f" (line{'s' if len(failed) > 1 else ''} {shown})"
        if args.fail_fast and judged + len(failed) < len(jobs):
            summary += f"; --fail-fast stopped at line {failed[-1]}"
    print(summary, file=sys.stderr)
    return EXIT_LINE_FAILED if failed else 0


def _library_error(error: Exception) -> str:
    """One line for an error the guard or adapter raised on this conversation."""
    from adapter.errors import AdapterError
    from guard import GuardError

    if isinstance(error, GuardError | AdapterError | ValueError | TypeError):
        return _one_line(error)
    return f"{type(error).__name__}: {_one_line(error)}"


def _read_input(name: str) -> list[bytes | str]:
    if name == "-":
        stream: BinaryIO | TextIO = getattr(sys.stdin, "buffer", sys.stdin)
        return list(stream)
    try:
        with open(name, "rb") as stream:
            return list(stream)
    except FileNotFoundError:
        raise SetupError(f"no input file {name!r}") from None
    except IsADirectoryError:
        raise SetupError(f"{name!r} is a folder; give a JSONL file, or - for standard input") from None
    except OSError as error:
        raise SetupError(f"cannot read {name!r}: {error.strerror or error}") from None


def _threads(args: argparse.Namespace) -> int | None:
    """CPU threads for the guard: --threads, else 1 for the tiny guard (its
    matrices are too small to share out, and on a shared machine a second
    thread that waits for a busy core made it 7-40x slower), else torch's
    default."""
    return args.threads if args.threads is not None else 1 if args.tiny else None


def _moderate(args: argparse.Namespace) -> int:
    lines = _read_input(args.input)
    check_device(args.device)
    generator = load_generator_tokenizer(args.generator)
    jobs = read_jobs(lines, generator)
    import torch

    threads, before = _threads(args), torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as folder:
            guard = load_guard(args, folder)
            return run_moderation(guard, generator, jobs, args)
    finally:
        torch.set_num_threads(before)


def _demo(args: argparse.Namespace) -> int:
    generator = load_generator_tokenizer(args.generator)
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as folder:
            guard = load_tiny_guard(folder, notice=sys.stdout)
            print("(Watch an answer get flagged mid-sentence at ' dynamite', and a prompt that says it judged "
                  "Unsafe.)\n")  # fmt: skip
            jobs = read_jobs([json.dumps(record) for record in DEMO_CONVERSATIONS], generator)
            args.json, args.no_progress, args.fail_fast, args.concurrency = False, True, False, 1
            return run_moderation(guard, generator, jobs, args)
    finally:
        torch.set_num_threads(before)


# --- the bridge ---------------------------------------------------------------


def _bridge(args: argparse.Namespace) -> int:
    from adapter import SourceDecoder
    from adapter.bundled_tokenizers import encode_text, qwen3_tokenizer
    from adapter.retokenize import StableRetokenizer

    generator = load_generator_tokenizer(args.generator)  # a wrong name is said before any typing
    if args.text is None and sys.stdin.isatty():  # else the command seems to hang
        print("crossguard bridge: reading the text from standard input; end it with Ctrl-D", file=sys.stderr)
    text = args.text if args.text is not None else sys.stdin.read()
    guard_vocabulary = qwen3_tokenizer()
    decoder, retokenizer = SourceDecoder(generator), StableRetokenizer(guard_vocabulary)
    ids = encode_text(generator, text)

    def show(kind: str, piece: Any, released) -> None:
        fields = (
            token_fields(piece.index, ids[piece.index], piece.text, piece.start, piece.end)
            if piece is not None
            else token_fields(None, None, "", None, None)
        )
        row = {
            "kind": kind,
            **fields,
            "qwen_ids": [token.id for token in released],
            "qwen_tokens": [guard_vocabulary.id_to_token(token.id) for token in released],
            "held_text": retokenizer.held_text,
        }
        print(json.dumps(row, ensure_ascii=False) if args.json else _bridge_row(row))

    for token_id in ids:
        for piece in decoder.push(token_id):
            show("token", piece, retokenizer.push(piece.text))
    for piece in decoder.flush():
        show("token", piece, retokenizer.push(piece.text))
    show("flush", None, retokenizer.flush())
    # What the guard receives after the text, as upstream's template closes the turn.
    for qwen_id in bridge_end_of_turn_ids(guard_vocabulary):
        row = {"kind": "end_of_turn", **end_of_turn_fields([qwen_id]), "held_text": ""}
        print(json.dumps(row, ensure_ascii=False) if args.json else _bridge_row(row))
    return 0


def bridge_end_of_turn_ids(guard_vocabulary: Any) -> list[int]:
    """``<|im_end|>`` and ``\\n``: guard.template.end_of_turn_ids (a test
    checks), spelled out so that the bridge does not import torch."""
    from adapter.retokenize import encode_ordinary

    return [guard_vocabulary.token_to_id("<|im_end|>"), *encode_ordinary(guard_vocabulary, "\n")]


def _bridge_row(row: dict) -> str:
    step = {"flush": "flush", "end_of_turn": "end of turn"}.get(row["kind"], f"id {row['generator_id']}")
    index = "" if row["generator_token"] is None else f"#{row['generator_token']:<4}"
    released = " ".join(f"{i}:{t!r}" for i, t in zip(row["qwen_ids"], row["qwen_tokens"], strict=True))
    return f"{step:>12} {index:>5} {row['text']!r:<14} → {released or '-':<40} held {row['held_text']!r}"


# --- arguments -----------------------------------------------------------------


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (a
    flag that is off, or a default the help text explains); descriptions are
    wrapped by ``_paragraphs``, so that examples keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        # A flag (--json, --no-tool-calls) has a default only in the sense of
        # being off: "(default: True)" on a store_false flag misleads.
        flag = action.nargs == 0
        if flag or action.default in (None, False, argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def _paragraphs(*paragraphs: str) -> str:
    return "\n\n".join(textwrap.fill(paragraph, 79) for paragraph in paragraphs)


def _add_policy_arguments(parser: argparse.ArgumentParser, generator: str) -> None:
    from adapter.bundled_tokenizers import GENERATORS

    parser.add_argument(
        "--generator", default=generator, metavar="NAME_OR_PATH",
        help=f"the chat model's tokenizer: {', '.join(GENERATORS)}, a tokenizer.json, a SentencePiece .model "
        "or a local tokenizer folder",
    )  # fmt: skip
    parser.add_argument("--mode", default="strict", choices=["strict", "loose"],
                        help="strict counts Controversial as Unsafe, loose as Safe")  # fmt: skip
    parser.add_argument("--debounce", default="official", choices=["official", "report"],
                        help="official: two consecutive Unsafe, else two consecutive Controversial tokens flag the "
                        "response (the evaluation code); report: two consecutive unsafe tokens (the technical "
                        "report)")  # fmt: skip
    parser.add_argument("--color", default="auto", choices=["auto", "always", "never"],
                        help="colour the view by verdict; auto: on a terminal, unless the NO_COLOR environment "
                        "variable is set")  # fmt: skip


def installed_version() -> str:
    """The version of the installed crossguard distribution."""
    try:
        return importlib.metadata.version("crossguard")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed: run pip install -e . in the checkout)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossguard", description="Moderate non-Qwen chat models with Qwen3Guard-Stream, token by token.",
        epilog=__doc__.split("\n\n", 1)[1].strip() + "\n\n" + _paragraphs(EXIT_STATUS),
        formatter_class=_HelpFormatter,
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}",
                        help="print crossguard's version and exit")  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True, metavar="{demo,moderate,bridge,serve}")

    demo = commands.add_parser(
        "demo", help="run the whole pipeline on a tiny random guard (meaningless verdicts)",
        description=_paragraphs("Moderate three built-in conversations with the tiny demo guard (the one "
                                "--tiny uses: ' dynamite' is Unsafe in answers and prompts, other text Safe), and "
                                "show each generator token coloured by its verdict."),
        formatter_class=_HelpFormatter,
    )  # fmt: skip
    _add_policy_arguments(demo, generator="mistral-v3")
    demo.set_defaults(run=_demo, context_limit="error", command_parser=demo)

    moderate = commands.add_parser(
        "moderate", help="moderate recorded conversations (JSONL)",
        description=_paragraphs(
            "Each JSONL line holds 'prompt' (text or chat messages) and 'response' (text, encoded with the "
            "generator tokenizer) or 'response_ids' (the generator's token ids). The response is streamed one "
            "generator token at a time through the guard. A line that cannot be judged gets an error row (with "
            "--json, {\"line\": N, \"kind\": \"error\", \"error\": ...}) and the others are still judged; a "
            "summary goes to standard error.", EXIT_STATUS,
        ),
        formatter_class=_HelpFormatter,
    )  # fmt: skip
    moderate.add_argument("input", help="a JSONL file, or - for standard input")
    moderate.add_argument("--guard", default=DEFAULT_GUARD, metavar="FOLDER_OR_HUB_ID",
                          help="Qwen3Guard-Stream checkpoint folder, or hub id (read from the Hugging Face cache, "
                          "else downloaded)")  # fmt: skip
    moderate.add_argument("--tiny", action="store_true",
                          help="use a tiny random guard instead of --guard (meaningless verdicts)")  # fmt: skip
    moderate.add_argument("--device", default=None,
                          help="torch device for the guard, e.g. cpu, cuda, cuda:1 (default: CUDA when available, "
                          "else the CPU; the CPU with --tiny)")  # fmt: skip
    moderate.add_argument(
        "--concurrency", type=_positive_int, default=1, metavar="N",
        help="judge N lines side by side on one GuardEngine (batched forwards); output keeps the input order",
    )  # fmt: skip
    moderate.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                          help="CPU threads for the guard (default: 1 with --tiny, whose matrices are too small "
                          "to share out; else torch's default)")  # fmt: skip
    moderate.add_argument("--context-limit", default="error", choices=["error", "continue"],
                          help="a conversation longer than the guard's context (its max_position_embeddings, 8192 "
                          "for the released checkpoints, the length it was trained on): error gives that line an "
                          "error row; continue judges past it, as upstream's code does, its rows marked "
                          "past_trained_length")  # fmt: skip
    moderate.add_argument("--json", action="store_true",
                          help="print JSON lines (see the README) instead of the coloured view")  # fmt: skip
    moderate.add_argument(
        "--fail-fast",
        action="store_true",
        help="stop at the first line that cannot be judged (default: report it and go on)",
    )
    moderate.add_argument("--no-progress", action="store_true",
                          help="no progress bar (default: one on long inputs, only when standard error is a "
                          "terminal)")  # fmt: skip
    _add_policy_arguments(moderate, generator="llama3")
    moderate.set_defaults(run=_moderate, command_parser=moderate)

    bridge = commands.add_parser(
        "bridge", help="show how a generator's tokens become stable Qwen3 ids",
        description=_paragraphs("Encode TEXT with a generator tokenizer, stream its ids one at a time through "
                                "SourceDecoder and StableRetokenizer, and print what each id releases."),
        formatter_class=_HelpFormatter,
    )  # fmt: skip
    bridge.add_argument("text", nargs="?", help="the response text (default: read standard input)")
    bridge.add_argument("--generator", default="llama3", metavar="NAME_OR_PATH",
                        help="the chat model's tokenizer (a bundled name or a path, as for moderate)")  # fmt: skip
    bridge.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    bridge.set_defaults(run=_bridge, command_parser=bridge)
    _add_serve_parser(commands)
    return parser


def _add_serve_parser(commands: Any) -> None:
    serve = commands.add_parser(
        "serve", help="run the OpenAI-compatible moderating gateway in front of an LLM server",
        description=_paragraphs(
            "Serve POST /v1/chat/completions (streaming and not), GET /v1/models, /health and /metrics. Prompts "
            "are judged before they are forwarded to --upstream; answers are re-emitted only once the guard has "
            "judged their text, and cut with finish_reason content_filter at a flag. API keys are best given in "
            "the environment: CROSSGUARD_API_KEY (what clients must send) and CROSSGUARD_UPSTREAM_API_KEY (what "
            "the upstream gets; without either, the client's Authorization header is forwarded).",
        ),
        formatter_class=_HelpFormatter,
    )  # fmt: skip
    upstream = serve.add_mutually_exclusive_group(required=True)
    upstream.add_argument("--upstream", metavar="URL",
                          help="the LLM server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1 (vLLM), "
                          "http://127.0.0.1:11434/v1 (Ollama), http://127.0.0.1:8080/v1 (llama.cpp)")  # fmt: skip
    upstream.add_argument("--demo-upstream", action="store_true",
                          help="instead of --upstream, serve in front of a tiny offline LLM server started in this "
                          "process: model tiny-llama3, a random 2-layer Llama with the Llama 3 vocabulary whose "
                          "answers are scripted (a question about stumps gets one that says ' dynamite'); implies "
                          "--generator llama3 --token-ids request")  # fmt: skip
    serve.add_argument("--generator", default=None, metavar="NAME_OR_PATH",
                       help="the chat model's tokenizer (a bundled name or a path, as for moderate), to judge "
                       "token ids when the upstream sends them; without it, text deltas are judged")  # fmt: skip
    serve.add_argument("--guard", default=DEFAULT_GUARD, metavar="FOLDER_OR_HUB_ID",
                       help="Qwen3Guard-Stream checkpoint folder, or hub id")  # fmt: skip
    serve.add_argument("--tiny", action="store_true",
                       help="use a tiny random guard wired to flag ' dynamite' in answers and prompts (meaningless "
                       "verdicts; for trying the gateway out)")  # fmt: skip
    serve.add_argument("--device", default=None, help="torch device for the guard (default: CUDA when available)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=_positive_int, default=8080, help="port to listen on")
    serve.add_argument("--mode", default="strict", choices=["strict", "loose"],
                       help="strict counts Controversial as Unsafe, loose as Safe")  # fmt: skip
    serve.add_argument("--prompts", default="block", choices=["block", "annotate"],
                       help="block: refuse a flagged prompt with HTTP 400 (code content_filter); annotate: forward "
                       "it and report the verdict in prompt_filter_results")  # fmt: skip
    serve.add_argument("--token-ids", default="use", choices=["use", "request", "off"],
                       help="use: judge the generator's token ids when chunks carry them (needs --generator); "
                       "request: also ask vLLM for them (return_token_ids); off: always judge text")  # fmt: skip
    serve.add_argument("--no-tool-calls", dest="judge_tool_calls", action="store_false",
                       help="do not judge tool-call arguments (they are judged by default)")  # fmt: skip
    serve.add_argument("--api-key", default=os.environ.get("CROSSGUARD_API_KEY"), help=argparse.SUPPRESS)
    serve.add_argument("--upstream-api-key", default=os.environ.get("CROSSGUARD_UPSTREAM_API_KEY"),
                       help=argparse.SUPPRESS)  # fmt: skip
    serve.add_argument("--fail-open", action="store_true",
                       help="when the guard fails, forward the answer unjudged instead of ending it with an error")
    serve.add_argument("--refusal", default=None, metavar="TEXT",
                       help="what a flagged non-streamed answer is replaced with")  # fmt: skip
    serve.add_argument("--max-streams", type=_positive_int, default=256, metavar="N",
                       help="concurrent chat requests; more get HTTP 429")  # fmt: skip
    serve.add_argument("--max-body-bytes", type=_positive_int, default=4 * 1024 * 1024, metavar="N",
                       help="largest request body; larger get HTTP 413")  # fmt: skip
    serve.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                       help="longest a request may take, stream included")  # fmt: skip
    serve.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="longest a client may take to send its request body (then HTTP 408)")  # fmt: skip
    serve.add_argument("--send-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="longest a client may leave a streamed chunk unread before it is dropped")  # fmt: skip
    serve.add_argument("--max-tool-calls", type=_positive_int, default=16, metavar="N",
                       help="tool calls one answer may make (each is judged as its own guard stream); more end "
                       "the answer with an error")  # fmt: skip
    serve.add_argument("--ray", action="store_true", help="run the gateway on Ray Serve (needs crossguard[ray])")
    # None by default, so that giving one without --ray is noticed (a usage error).
    serve.add_argument("--replicas", type=_positive_int, default=None, metavar="N",
                       help="Ray Serve replicas (with --ray; default 1)")  # fmt: skip
    serve.add_argument("--num-gpus", type=float, default=None, metavar="X",
                       help="GPUs per replica (with --ray; default 0)")  # fmt: skip
    serve.add_argument("--max-replicas", type=_positive_int, default=None, metavar="N",
                       help="autoscale from 1 to N replicas on ongoing requests instead of --replicas (with --ray)")
    serve.add_argument("--ray-address", default=None, metavar="ADDRESS",
                       help="the Ray cluster to join (with --ray; default: RAY_ADDRESS, else a local cluster)")
    serve.set_defaults(run=_serve, command_parser=serve)


def gateway_config(args: argparse.Namespace, guard: str) -> Any:
    from integrations.gateway import DEFAULT_REFUSAL, GatewayConfig

    try:
        return GatewayConfig(
            upstream=args.upstream, generator=args.generator, guard=guard, mode=args.mode, prompts=args.prompts,
            token_ids=args.token_ids, judge_tool_calls=args.judge_tool_calls, api_key=args.api_key,
            upstream_api_key=args.upstream_api_key, fail_open=args.fail_open, refusal=args.refusal or DEFAULT_REFUSAL,
            max_streams=args.max_streams, max_body_bytes=args.max_body_bytes, request_timeout_s=args.request_timeout,
            body_timeout_s=args.body_timeout, send_timeout_s=args.send_timeout, max_tool_calls=args.max_tool_calls,
            device=args.device,
        )  # fmt: skip
    except ValueError as error:
        raise SetupError(str(error)) from error


def _serve(args: argparse.Namespace) -> int:
    from integrations.extras import install_hint

    # Before the gateway's import (torch and transformers: seconds) and before any guard loads (minutes).
    if args.upstream is not None and not args.upstream.startswith(("http://", "https://")):
        raise SetupError(f"--upstream must be an http(s) URL such as http://127.0.0.1:8000/v1, got {args.upstream!r}")
    if args.ray and importlib.util.find_spec("ray") is None:
        raise SetupError(f"--ray needs Ray Serve, which is not installed: {install_hint('ray')}")
    if not args.ray:  # Serve's proxy listens instead, where Ray puts it
        check_port_free(args.host, args.port)
    try:
        import uvicorn

        from integrations.gateway import create_app
    except ImportError as error:
        raise SetupError(f"{error} ({install_hint('gateway')})") from error
    check_device(args.device)
    if args.demo_upstream:
        args.generator = args.generator or "llama3"
        args.token_ids = "request" if args.token_ids == "use" else args.token_ids
    if args.generator is not None:
        load_generator_tokenizer(args.generator)  # a wrong name fails here, before the server starts
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="crossguard-tiny-guard-"))
        if args.demo_upstream:
            args.upstream = _demo_upstream(stack)
        guard = None
        if args.tiny:
            guard = load_tiny_guard(folder, device=args.device)
        config = gateway_config(args, folder if args.tiny else args.guard)
        if args.ray:
            try:
                from integrations.ray_serve import run_on_ray

                autoscaling = {"max_replicas": args.max_replicas} if args.max_replicas else None
                return run_on_ray(config, host=args.host, port=args.port, address=args.ray_address,
                                  replicas=args.replicas or 1, num_gpus=args.num_gpus or 0.0,
                                  autoscaling=autoscaling)  # fmt: skip
            except ImportError as error:
                raise SetupError(str(error)) from error
        if guard is None:
            guard = load_guard(args, folder)
        uvicorn.run(create_app(config, guard=guard), host=args.host, port=args.port, log_level="info")
    return 0


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another server holds now, before anything loads: uvicorn
    finds out only once the guard is loaded, and exits with status 3."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as error:
        raise SetupError(f"--host {host!r} is not an address this machine can listen on ({error})") from error
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a port in TIME_WAIT is free
        try:
            probe.bind(address)
        except OSError as error:
            raise SetupError(
                f"cannot listen on {host}:{port} ({error.strerror or error}); another server holds it "
                "(a crossguard serve still running?): stop it, or pass --port with a free port"
            ) from error


def _demo_upstream(stack: contextlib.ExitStack) -> str:
    """Start the tiny offline LLM server of --demo-upstream (stopped with
    ``stack``); its base URL."""
    from integrations.demo_upstream import MODEL_NAME, UpstreamServer, demo_answer

    server = stack.enter_context(UpstreamServer(answers=demo_answer))
    print(f"demo upstream: model {MODEL_NAME!r} (a random 2-layer Llama, Llama 3 vocabulary, scripted answers) at "
          f"{server.url}", file=sys.stderr)  # fmt: skip
    return server.url


def _silence_stdout() -> None:
    """The reader of standard output went away: point it at /dev/null so that
    Python's final flush does not print a BrokenPipeError of its own."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        pass  # not a real file (captured in-process): nothing will flush into a pipe


RAY_OPTIONS = ("replicas", "num_gpus", "max_replicas", "ray_address")


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command's arguments; a usage error exits with status 2 and the
    usage of the subcommand it concerns (not the top-level usage)."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "serve" and not args.ray:
        given = [f"--{name.replace('_', '-')}" for name in RAY_OPTIONS if getattr(args, name) is not None]
        if given:
            args.command_parser.error(f"{', '.join(given)} only work{'s' if len(given) == 1 else ''} with --ray")
    if getattr(args, "tiny", False) and args.guard != DEFAULT_GUARD:  # one of them would be ignored
        args.command_parser.error("--tiny is the tiny demo guard, --guard a real one: give one of them")
    if args.command == "serve" and args.demo_upstream and args.generator not in (None, "llama3"):
        args.command_parser.error(
            f"--demo-upstream sends Llama 3 token ids, which --generator {args.generator} would misread: leave "
            "--generator out"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = parse_arguments(argv)
    try:
        status = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return status
    except SetupError as error:
        print(f"crossguard: {error}", file=sys.stderr)
        return EXIT_SETUP
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_CLOSED_PIPE
    except KeyboardInterrupt:
        print("crossguard: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
