"""The guard's failure paths: checkpoints it must refuse, steps that fail
half way, sessions shared by threads, misuse after close and rollback.

Every checkpoint here is written by ``guard.testing.write_tiny_checkpoint``
and then damaged the way a real one can be, so the real loading code runs.
"""

from __future__ import annotations

import json
import random
import re
import threading

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from adapter.bundled_tokenizers import qwen3_tokenizer_path
from guard import CheckpointError, SessionStateError, StreamGuard
from guard.errors import DtypeError
from guard.testing import write_tiny_checkpoint

SHARD_1, SHARD_2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
IDS = [9707, 1879, 11, 432, 594, 220, 264]


def tiny(folder, **options):
    return write_tiny_checkpoint(folder, tokenizer_json=qwen3_tokenizer_path(), **options)


def edit_config(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def edit_shard(path, change):
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def refusal(folder, **options) -> str:
    """The message of the CheckpointError loading ``folder`` raises: one line,
    the original error (if any) chained, not shown."""
    with pytest.raises(CheckpointError) as caught:
        StreamGuard.from_pretrained(folder, device="cpu", **options)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def assert_same_verdicts(got, expected):
    assert [(v.position, v.risk_level, v.category, v.flagged) for v in got] == [
        (v.position, v.risk_level, v.category, v.flagged) for v in expected
    ]
    for mine, theirs in zip(got, expected, strict=True):
        assert mine.risk_prob == pytest.approx(theirs.risk_prob, abs=1e-6)


# --- dtypes ---------------------------------------------------------------------


@pytest.mark.parametrize("declared", [torch.float32, torch.bfloat16])
def test_shards_of_different_dtypes_load_in_the_declared_dtype(tmp_path, declared):
    folder = tiny(tmp_path, shards=2, dtype=declared, shard_dtypes=[torch.bfloat16, torch.float32])
    guard = StreamGuard.from_pretrained(folder, device="cpu")
    assert guard.dtype == declared
    assert {value.dtype for value in guard.model.state_dict().values()} == {declared}
    session = guard.session()  # the first use crashed with mixed parameters
    session.moderate_prompt("hi")
    assert len(session.append(IDS)) == len(IDS)
    asked = StreamGuard.from_pretrained(folder, device="cpu", dtype="float16")
    assert {value.dtype for value in asked.model.state_dict().values()} == {torch.float16}


def test_shards_of_different_dtypes_with_no_declared_dtype_are_refused_naming_them(tmp_path):
    folder = tiny(tmp_path, shards=2, shard_dtypes=[torch.bfloat16, torch.float32])
    edit_config(folder, lambda config: config.pop("torch_dtype"))
    message = refusal(folder)
    assert f"{SHARD_1}: bfloat16; {SHARD_2}: float32" in message
    assert "pass dtype='bfloat16'" in message
    assert StreamGuard.from_pretrained(folder, device="cpu", dtype="bfloat16").dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("dtype", "message"),
    [
        ("fp16", r"dtype 'fp16' is a shorthand from_pretrained does not take; pass 'float16'"),
        ("bf16", r"pass 'bfloat16'"),
        ("float64", r"does not run in torch\.float64; pass 'float32', 'bfloat16' or 'float16'"),
        (torch.float64, r"does not run in torch\.float64"),
        (torch.int8, r"torch\.int8 is not a floating-point dtype and crossguard does not quantize the guard; pass"),
        ("int8", r"torch\.int8 is not a floating-point dtype"),
        ("banana", r"dtype 'banana' is not a dtype from_pretrained knows; pass 'float32'"),
        (16, r"dtype 16 is not a dtype from_pretrained knows"),
    ],
)
def test_unsupported_dtypes_are_refused_before_anything_is_read(tmp_path, dtype, message):
    # the folder does not even exist: the argument is checked first
    with pytest.raises(DtypeError, match=message) as caught:
        StreamGuard.from_pretrained(tmp_path / "not-there", device="cpu", dtype=dtype)
    assert isinstance(caught.value, ValueError) and "\n" not in str(caught.value)


def test_auto_means_the_stored_dtype(tiny_checkpoint):
    assert StreamGuard.from_pretrained(tiny_checkpoint, device="cpu", dtype="auto").dtype == torch.float32


# --- damaged files --------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 4, 50, -100])
def test_a_truncated_shard_is_named(tmp_path, keep):
    folder = tiny(tmp_path, shards=2)
    shard = folder / SHARD_2
    data = shard.read_bytes()
    shard.write_bytes(data[:keep])
    message = refusal(folder)
    assert str(shard) in message and "truncated or damaged" in message and "download it again" in message


def test_a_truncated_shard_chains_the_original_error(tmp_path):
    folder = tiny(tmp_path)
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError) as caught:
        StreamGuard.from_pretrained(folder, device="cpu")
    assert isinstance(caught.value.__cause__, SafetensorError)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"model_type": "qwen3",', r"config\.json is not valid JSON \(.*line 1.*\); download the checkpoint's"),
        ("\xff\xfe", r"config\.json is not valid JSON"),
        ("[1, 2]", r"config\.json holds a JSON list, not an object of config fields"),
    ],
)
def test_a_config_that_is_not_json_is_named(tmp_path, text, message):
    folder = tiny(tmp_path)
    (folder / "config.json").write_bytes(text.encode("latin-1"))
    assert re.search(message, refusal(folder))


def test_a_damaged_tokenizer_is_named(tmp_path):
    folder = tiny(tmp_path)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    message = refusal(folder)
    assert f"{folder / 'tokenizer.json'} is not a readable tokenizer" in message and "download" in message


def test_a_shard_index_that_is_not_json_is_named(tmp_path):
    folder = tiny(tmp_path, shards=2)
    (folder / "model.safetensors.index.json").write_text("{")
    assert "model.safetensors.index.json is not a valid shard index" in refusal(folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update(num_hidden_layers="two"), "num_hidden_layers must be a positive integer, got 'two'"),
        (lambda c: c.update(hidden_size=64.0), "hidden_size must be a positive integer, got 64.0"),
        (lambda c: c.update(num_attention_heads=True), "num_attention_heads must be a positive integer, got True"),
        (lambda c: c.update(rms_norm_eps="small"), "rms_norm_eps must be a positive number, got 'small'"),
        (lambda c: c.update(guard_inner_size="32"), "guard_inner_size must be a positive integer, got '32'"),
        (lambda c: c.update(num_risk_level="3"), "num_risk_level must be a positive integer, got '3'"),
        (
            lambda c: c.update(response_risk_level_map=["Safe", "Unsafe", "Controversial"]),
            "response_risk_level_map must be a JSON object mapping class indices to names",
        ),
        (lambda c: c.update(query_category_map="Violent"), "query_category_map must be a JSON object"),
        (lambda c: c["response_category_map"].update({"0": 7}), "response_category_map must be a JSON object"),
        (lambda c: c["query_risk_level_map"].update({"one": "x"}), "query_risk_level_map has the key 'one'"),
        (lambda c: c.update(rope_scaling="linear"), r"does not describe a valid Qwen3 model \(.*rope"),
    ],
)
def test_config_fields_of_the_wrong_type_are_named(tmp_path, change, message):
    folder = tiny(tmp_path)
    edit_config(folder, change)
    got = refusal(folder)
    assert re.search(message, got), got
    assert str(folder / "config.json") in got
    assert "correct" in got  # says what to do


def test_the_same_tensor_in_two_shards_is_refused_naming_both(tmp_path):
    folder = tiny(tmp_path, shards=2)
    first = load_file(str(folder / SHARD_1))
    key = sorted(first)[0]
    edit_shard(folder / SHARD_2, lambda tensors: tensors.update({key: first[key] + 1}))
    message = refusal(folder)
    assert f"the tensor {key} is in two shards, {SHARD_1} and {SHARD_2}" in message


# --- quantized copies ---------------------------------------------------------


def test_a_quantization_config_is_refused(tmp_path):
    folder = tiny(tmp_path)
    fp8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    edit_config(folder, lambda config: config.update(quantization_config=fp8))
    message = refusal(folder)
    assert "has a quantization_config (quant_method 'fp8')" in message
    assert "use the original bf16 checkpoint (e.g. Qwen/Qwen3Guard-Stream-0.6B)" in message


@pytest.mark.parametrize(
    ("stored", "name"), [(torch.float8_e4m3fn, "F8_E4M3"), (torch.int8, "I8"), (torch.uint8, "U8")]
)
def test_weights_stored_as_non_float_types_are_refused(tmp_path, stored, name):
    folder = tiny(tmp_path)
    key = "model.layers.0.mlp.down_proj.weight"
    edit_shard(folder / "model.safetensors", lambda tensors: tensors.update({key: tensors[key].to(stored)}))
    message = refusal(folder)
    assert f"stores tensors as {name} ({key})" in message
    assert "use the original bf16 checkpoint (e.g. Qwen/Qwen3Guard-Stream-0.6B)" in message


@pytest.mark.parametrize("suffix", ["weight_scale_inv", "weight_scale", "input_scale"])
def test_scale_tensors_that_would_be_ignored_are_refused(tmp_path, suffix):
    # An FP8-style copy keeps float shapes: only its scales betray it.
    folder = tiny(tmp_path, dtype=torch.bfloat16)
    key = f"model.layers.1.self_attn.q_proj.{suffix}"
    edit_shard(folder / "model.safetensors", lambda tensors: tensors.update({key: torch.ones(1, 1)}))
    message = refusal(folder)
    assert f"quantization tensors ({key}) that the guard would silently ignore" in message
    assert "Qwen/Qwen3Guard-Stream-0.6B" in message


def test_unrelated_extra_tensors_are_still_only_reported(tmp_path):
    folder = tiny(tmp_path)
    edit_shard(folder / "model.safetensors", lambda tensors: tensors.update({"lm_head.weight": torch.ones(2, 2)}))
    assert StreamGuard.from_pretrained(folder, device="cpu").ignored_weights == ["lm_head.weight"]


def test_the_older_risk_level_map_name_is_accepted(tmp_path):
    folder = tiny(tmp_path)
    edit_config(folder, lambda config: config.update(risk_level_map=config.pop("response_risk_level_map")))
    guard = StreamGuard.from_pretrained(folder, device="cpu")
    assert guard.labels.risk_levels == ("Safe", "Unsafe", "Controversial")


# --- a step that fails half way ----------------------------------------------


@pytest.fixture(scope="module")
def guard(tiny_checkpoint):
    """A guard of its own: some tests patch its model."""
    return StreamGuard.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32")


def fail_once(monkeypatch, target, name, error):
    original = getattr(target, name)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)
    return calls


def cached_length(session):
    return session._kv.length  # positions its KV region holds, every layer alike


# 300 ids: more than one step (SESSION_CHUNK, 256), and more room than the session's region has.
FIRST, SECOND = IDS, [random.Random(7).randrange(151643) for _ in range(300)]


@pytest.mark.parametrize(
    ("where", "error"),
    [
        ("second_layer", RuntimeError("CUDA out of memory")),
        ("second_layer", KeyboardInterrupt()),
        ("second_step", RuntimeError("CUDA out of memory")),
        ("reserve", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")),
        ("heads", RuntimeError("CUDA out of memory")),
    ],
)
def test_a_step_that_fails_half_way_changes_nothing(guard, monkeypatch, where, error):
    session = guard.session()
    session.moderate_prompt("hi")
    session.append(FIRST)
    position, kv_bytes = session.position, session.kv_cache_bytes()[0]
    if where == "heads":
        calls = fail_once(monkeypatch, guard.model, "response_logits", error)
    elif where == "reserve":  # making room for the new positions (KVPool.reserve is all or nothing)
        calls = fail_once(monkeypatch, session._runner.pool, "reserve", error)
    elif where == "second_layer":  # after the first layer wrote the new keys and values
        calls = fail_once(monkeypatch, guard.model.model.layers[1].mlp, "forward", error)
    else:  # the call's second step fails after its first step was cached
        mlp = guard.model.model.layers[1].mlp
        calls = []

        def second_step_fails(x):
            calls.append(x.shape[1])
            if len(calls) == 2:
                raise error
            return type(mlp).forward(mlp, x)

        monkeypatch.setattr(mlp, "forward", second_step_fails)
    with pytest.raises(type(error)):
        session.append(SECOND)
    assert calls
    monkeypatch.undo()
    assert session.position == position
    assert cached_length(session) == position
    assert session.kv_cache_bytes()[0] == kv_bytes
    retried = session.append(SECOND)  # usable afterwards: as if the failed call never happened

    fresh = guard.session()
    fresh.moderate_prompt("hi")
    fresh.append(FIRST)
    assert_same_verdicts(retried, fresh.append(SECOND))
    assert (session.last_logits.risk_level - fresh.last_logits.risk_level).abs().max() <= 1e-5


def test_a_prompt_that_fails_half_way_changes_nothing(guard, monkeypatch):
    session = guard.session()
    fail_once(monkeypatch, guard.model.model.layers[1].mlp, "forward", RuntimeError("CUDA out of memory"))
    with pytest.raises(RuntimeError):
        session.moderate_prompt("hi")
    assert session.position == 0 and session.response_start is None and session.query_verdict is None
    assert cached_length(session) == 0
    verdict = session.moderate_prompt("hi")
    fresh = guard.session()
    assert verdict == fresh.moderate_prompt("hi")
    assert_same_verdicts(session.append(IDS), fresh.append(IDS))


def test_a_failure_after_a_flag_keeps_the_debounce_state(guard, monkeypatch):
    session = guard.session()
    session.moderate_prompt("hi")
    session.append(IDS)
    flagged = session.flagged
    fail_once(monkeypatch, guard.model, "response_logits", RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        session.append(IDS)
    assert session.flagged == flagged
    assert [v.position for v in session.append(IDS)] == list(range(session.position - len(IDS), session.position))


# --- threads ----------------------------------------------------------------------


def test_threads_sharing_a_session_are_served_one_call_at_a_time(tiny_guard):
    session = tiny_guard.session()
    session.moderate_prompt("Tell me a story")
    start = session.position
    calls: list[tuple[list[int], list]] = []  # (ids, verdicts) of every append, in no particular order
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def hammer(seed):
        rng = random.Random(seed)
        barrier.wait()
        try:
            for _ in range(40):
                ids = [rng.randrange(151643) for _ in range(rng.randint(1, 3))]
                calls.append((ids, session.append(ids)))
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=hammer, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    calls.sort(key=lambda call: call[1][0].position)
    total = sum(len(ids) for ids, _ in calls)
    positions = [verdict.position for _, verdicts in calls for verdict in verdicts]
    assert positions == list(range(start, start + total))  # no overlap, no gap
    assert session.position == start + total
    assert cached_length(session) == start + total

    alone = tiny_guard.session()
    alone.moderate_prompt("Tell me a story")
    for ids, verdicts in calls:  # the same calls in the order they took, one thread
        assert_same_verdicts(verdicts, alone.append(ids))


# --- close and rollback ------------------------------------------------------------


def test_kv_cache_bytes_after_close_is_zero(tiny_guard):
    session = tiny_guard.session()
    session.moderate_prompt("hi")
    assert session.kv_cache_bytes()[0] > 0
    session.close()
    assert session.kv_cache_bytes() == (0, 0)
    session.close()  # closing twice is harmless
    assert session.kv_cache_bytes() == (0, 0)


def test_rollback_errors_say_what_happened_and_change_nothing(tiny_guard):
    session = tiny_guard.session()
    session.moderate_prompt("hi")
    session.append(IDS)
    position, start = session.position, session.response_start
    with pytest.raises(SessionStateError) as past:
        session.rollback(position + 3)
    assert f"position {position + 3}: it is past the end, the session is at position {position}" in str(past.value)
    assert "append ids to go forward" in str(past.value) and "prompt" not in str(past.value)
    with pytest.raises(SessionStateError) as into:
        session.rollback(start - 1)
    assert f"inside the prompt (the response starts at {start})" in str(into.value)
    assert "StreamGuard.session()" in str(into.value) and "past the end" not in str(into.value)
    with pytest.raises(TypeError):
        session.rollback(start + 0.5)
    assert session.position == position
    session.rollback(position)  # to where it is: nothing to do
    fresh = tiny_guard.session()
    fresh.moderate_prompt("hi")
    fresh.append(IDS)
    assert_same_verdicts(session.append(IDS), fresh.append(IDS))


def test_every_step_reads_the_cached_positions(tiny_guard):
    """An append is judged with its context: wiping the session's cached keys
    and values changes the next verdict's logits (a step that ignored the
    cache would not notice)."""
    sessions = [tiny_guard.session() for _ in range(2)]
    for session in sessions:
        session.moderate_prompt("Hello")
    wiped = sessions[1]._kv
    with torch.inference_mode():  # the pool's storage is made inside the steps' inference mode
        sessions[1]._runner.pool.storage[:, :, wiped.base : wiped.base + wiped.length] = 0
    logits = []
    for session in sessions:
        session.append([9707])
        logits.append(session.last_logits.risk_level)
    assert (logits[0] - logits[1]).abs().max() > 1e-3


def test_the_session_really_uses_its_cache(tiny_guard):
    session = tiny_guard.session()
    session.moderate_prompt("Hello")
    session.append([9707, 1879])
    used, _ = session.kv_cache_bytes()
    assert used == session.position * tiny_guard.kv_bytes_per_token()
