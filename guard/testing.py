"""Tiny random Qwen3Guard-Stream checkpoints in the real on-disk layout.

Real weights cannot be fetched in tests or on a fresh machine, so this writes
what a real checkpoint folder holds (config.json with the real field names
and label maps, safetensors, the real Qwen3 tokenizer files), only small and
random; ``StreamGuard.from_pretrained`` then loads it through the same code as
a real one. Verdicts of a random checkpoint are meaningless.

``tiny_guard`` is the one tiny guard that ``crossguard demo``, ``moderate
--tiny``, ``serve --tiny`` and the README's offline examples share: Safe on
ordinary text, Unsafe on `` dynamite``, and meaningless otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

if TYPE_CHECKING:
    from guard.stream_guard import StreamGuard

__all__ = ["LABEL_MAPS", "TINY_GUARD_WARNING", "TINY_UNSAFE_TEXT", "tiny_guard", "write_tiny_checkpoint",
           "write_tiny_guard"]  # fmt: skip

#: The text the tiny guard calls Unsafe: in an answer (its two Qwen3 tokens,
#: `` dynam`` and ``ite``, one after the other flag it) and in a prompt (the
#: query head refuses any prompt holding the token `` dynam``).
TINY_UNSAFE_TEXT = " dynamite"
TINY_GUARD_WARNING = (
    "DEMO GUARD: a tiny randomly initialised Qwen3Guard-Stream checkpoint, wired so that ' dynamite' is Unsafe "
    "and other text Safe. Its verdicts are MEANINGLESS; only the pipeline (tokenizers, re-tokenization, "
    "KV-cached guard, verdict mapping) is real."
)

LABEL_MAPS = {
    "response_risk_level_map": {"0": "Safe", "1": "Unsafe", "2": "Controversial"},
    "response_category_map": {
        "0": "Violent",
        "1": "Sexual Content or Sexual Acts",
        "2": "Suicide & Self-Harm",
        "3": "Politically Sensitive Topics",
        "4": "PII",
        "5": "Copyright Violation",
        "6": "Non-violent Illegal Acts",
        "7": "Unethical Acts",
    },
    "query_risk_level_map": {"0": "Safe", "1": "Unsafe", "2": "Controversial"},
}
LABEL_MAPS["query_category_map"] = {**LABEL_MAPS["response_category_map"], "8": "Jailbreak"}

QWEN3_VOCAB_SIZE = 151936  # embedding rows of every Qwen3 checkpoint (the tokenizer uses 151669)


def _config(
    *, hidden_size: int, layers: int, heads: int, kv_heads: int, head_dim: int, intermediate: int,
    inner: int, max_positions: int, dtype: torch.dtype,
) -> dict:  # fmt: skip
    return {
        "architectures": ["Qwen3ForGuardModel"],
        "auto_map": {"AutoModel": "modeling_qwen3_guard.Qwen3ForGuardModel"},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": max_positions,
        "max_window_layers": layers,
        "model_type": "qwen3",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": QWEN3_VOCAB_SIZE,
        "guard_inner_size": inner,
        "num_risk_level": 3,
        "num_category": 8,
        "num_query_risk_level": 3,
        "num_query_category": 9,
        **LABEL_MAPS,
    }


def _wire_risk_levels(
    tensors: dict[str, torch.Tensor], unsafe: list[int], controversial: list[int], near_tie: float | None
) -> None:
    """Make the response head call exactly these tokens Unsafe (category 0)
    or Controversial (category 7), and every other token Safe.

    Every token embedding gets a large constant in hidden dimension 1, the
    chosen tokens a ten times larger one in dimension 0 (Unsafe) or 2
    (Controversial); these dominate the residual stream of a small random
    model, so after the final RMSNorm the chosen dimension is about
    sqrt(hidden) at the chosen tokens and about 0 elsewhere, and dimension 1
    the other way round. The head reads just those dimensions.

    ``near_tie`` (with no chosen tokens): every token gets an Unsafe logit
    about ``near_tie`` above a Safe logit of exactly 0, and a very low
    Controversial one: a near tie that float32 calls Unsafe and upstream's
    bf16 arithmetic calls Safe when ``near_tie`` is below about 0.004.
    """
    if near_tie is not None and (unsafe or controversial):
        raise ValueError("near_tie makes every token a near tie; it takes no unsafe or controversial tokens")
    inner = tensors["risk_level_category_pre.weight"].shape[0]
    embeddings = tensors["model.embed_tokens.weight"]
    embeddings[:, 0] = 0.0
    embeddings[:, 1] = 1.0
    embeddings[:, 2] = 0.0
    embeddings[unsafe, 0] = 10.0
    embeddings[controversial, 2] = 10.0
    pre = torch.zeros_like(tensors["risk_level_category_pre.weight"])
    pre[0, 0] = pre[1, 1] = pre[2, 2] = 1.0
    tensors["risk_level_category_pre.weight"] = pre
    tensors["risk_level_category_layernorm.weight"] = torch.ones_like(tensors["risk_level_category_layernorm.weight"])
    risk = torch.zeros_like(tensors["risk_level_head.weight"])
    if near_tie is None:
        risk[1, 0] = 10.0  # Unsafe ← dimension 0
        risk[2, 2] = 10.0  # Controversial ← dimension 2
        risk[0, 1] = 10.0  # Safe ← dimension 1
    else:
        # Dimension 1 is about sqrt(inner) after the head's RMSNorm; the Safe
        # row stays 0, so the Safe logit is exactly 0.
        risk[1, 1] = near_tie / inner**0.5
        risk[2, 1] = -4.0
    tensors["risk_level_head.weight"] = risk
    category = torch.zeros_like(tensors["category_head.weight"])
    category[0, 0] = 10.0
    category[7, 2] = 10.0
    tensors["category_head.weight"] = category


def _wire_prompt_risk(tensors: dict[str, torch.Tensor], unsafe_prompt: list[int], layers: int) -> None:
    """Make the query head call a prompt Unsafe (category 0) exactly when it
    holds one of these tokens, and Safe otherwise.

    The query verdict is read at the ``<|im_end|>`` closing the user turn, so
    it must see the whole prompt: layer 0's attention is made uniform (zero
    queries and keys), its values read hidden dimension 4 (where only the
    chosen tokens' embeddings are non-zero) and its output writes dimension
    3, which nothing else writes. At ``<|im_end|>`` dimension 3 then holds
    about 10 / (tokens so far) per chosen token, and exactly 0 without one;
    the query head calls Unsafe when dimension 3 passes a thousandth of the
    constant dimension 1, i.e. for prompts shorter than about 1000 tokens.
    """
    embeddings = tensors["model.embed_tokens.weight"]
    embeddings[:, 3] = 0.0
    embeddings[:, 4] = 0.0
    embeddings[unsafe_prompt, 4] = 10.0
    prefix = "model.layers.0.self_attn."
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        tensors[prefix + name + ".weight"] = torch.zeros_like(tensors[prefix + name + ".weight"])
    tensors[prefix + "v_proj.weight"][0, 4] = 1.0  # kv head 0, dimension 0 ← hidden dimension 4
    for layer in range(layers):
        tensors[f"model.layers.{layer}.mlp.down_proj.weight"][3, :] = 0.0
        tensors[f"model.layers.{layer}.self_attn.o_proj.weight"][3, :] = 0.0
    tensors[prefix + "o_proj.weight"][3, 0] = 1.25  # hidden dimension 3 ← head 0 (kv head 0), dimension 0
    pre = torch.zeros_like(tensors["query_risk_level_category_pre.weight"])
    pre[0, 3] = pre[1, 1] = 1.0
    tensors["query_risk_level_category_pre.weight"] = pre
    norm = "query_risk_level_category_layernorm.weight"
    tensors[norm] = torch.ones_like(tensors[norm])
    risk = torch.zeros_like(tensors["query_risk_level_head.weight"])
    risk[1, 0] = 1000.0  # Unsafe ← dimension 3
    risk[0, 1] = 1.0  # Safe ← dimension 1
    tensors["query_risk_level_head.weight"] = risk
    category = torch.zeros_like(tensors["query_category_head.weight"])
    category[0, 0] = 10.0
    tensors["query_category_head.weight"] = category


def write_tiny_checkpoint(
    folder: str | os.PathLike[str],
    *,
    tokenizer_json: str | os.PathLike[str],
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    intermediate: int = 128,
    inner: int = 32,
    max_positions: int = 8192,
    dtype: torch.dtype = torch.float32,
    shards: int = 1,
    shard_dtypes: Sequence[torch.dtype] | None = None,
    seed: int = 0,
    unsafe_token_ids: Iterable[int] = (),
    controversial_token_ids: Iterable[int] = (),
    near_tie: float | None = None,
    unsafe_prompt_token_ids: Iterable[int] | None = None,
    drop: Iterable[str] = (),
    as_causal_lm: bool = False,
) -> Path:
    """Write a random checkpoint; return its folder.

    ``tokenizer_json``: the Qwen3 tokenizer.json to ship with it (e.g.
    ``adapter.bundled_tokenizers.qwen3_tokenizer_path()``); the files beside
    it (tokenizer_config.json, vocab.json) are copied too.

    ``shard_dtypes``: one dtype per shard, overriding ``dtype`` (which the
    config still declares), to write what a badly merged checkpoint holds.
    ``max_positions``: the config's ``max_position_embeddings``, 8192 like the
    released checkpoints.
    ``unsafe_token_ids``, ``controversial_token_ids``: guard tokens the
    response head must call Unsafe, Controversial (every other token is then
    Safe); ``near_tie``: make every other token a near tie instead (see
    ``_wire_risk_levels``). ``unsafe_prompt_token_ids``: the query head calls
    a prompt Unsafe exactly when it holds one of these tokens (see
    ``_wire_prompt_risk``; None leaves the query head random).
    ``drop``: tensor names to leave out; ``as_causal_lm``: write what a
    ``Qwen3ForCausalLM`` export of the model holds (an lm_head, no guard
    heads, no guard config fields) to test that such a copy is refused.
    """
    from guard.config import guard_labels
    from guard.model import Qwen3GuardStream

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = _config(
        hidden_size=hidden_size, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        intermediate=intermediate, inner=inner, max_positions=max_positions, dtype=dtype,
    )  # fmt: skip
    from transformers import Qwen3Config

    torch.manual_seed(seed)
    model = Qwen3GuardStream(Qwen3Config.from_dict(config), guard_labels(config))
    tensors = {key: value.detach().clone() for key, value in model.state_dict().items()}
    # transformers' init leaves RMSNorm weights at 1; make them random too so
    # tests notice a norm that is skipped or applied twice.
    for key, value in tensors.items():
        if key.endswith("norm.weight"):
            tensors[key] = 1.0 + 0.1 * torch.randn_like(value)
    unsafe, controversial = sorted(set(unsafe_token_ids)), sorted(set(controversial_token_ids))
    if unsafe or controversial or near_tie is not None:
        _wire_risk_levels(tensors, unsafe, controversial, near_tie)
    if unsafe_prompt_token_ids is not None:
        _wire_prompt_risk(tensors, sorted(set(unsafe_prompt_token_ids)), layers)
    if as_causal_lm:
        tensors = {key: value for key, value in tensors.items() if key.startswith("model.")}
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        config = {key: value for key, value in config.items() if "guard" not in key and "risk" not in key}
        config = {key: value for key, value in config.items() if "categor" not in key}
        config["architectures"] = ["Qwen3ForCausalLM"]
        config.pop("auto_map")
    for key in drop:
        tensors.pop(key)
    tensors = {key: value.to(dtype).contiguous() for key, value in tensors.items()}

    (folder / "config.json").write_text(json.dumps(config, indent=2))
    keys = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for shard in range(shards):
            name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
            part = {key: tensors[key] for key in keys[shard::shards]}
            if shard_dtypes is not None:
                part = {key: value.to(shard_dtypes[shard]) for key, value in part.items()}
            save_file(part, str(folder / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, name))
        total = sum(tensor.nbytes for tensor in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    tokenizer_folder = Path(tokenizer_json).parent
    shutil.copy(tokenizer_json, folder / "tokenizer.json")
    for name in ("tokenizer_config.json", "vocab.json"):
        if (tokenizer_folder / name).is_file():
            shutil.copy(tokenizer_folder / name, folder / name)
    return folder


def write_tiny_guard(folder: str | os.PathLike[str], *, tokenizer_json: str | os.PathLike[str]) -> Path:
    """Write the tiny demo guard's checkpoint (see ``tiny_guard``) into
    ``folder``; return the folder."""
    from tokenizers import Tokenizer

    from guard.template import encode_plain_text

    unsafe = encode_plain_text(Tokenizer.from_file(str(tokenizer_json)), TINY_UNSAFE_TEXT)
    # The prompt wiring takes the word's first token only: its second ("ite")
    # ends ordinary words too ("Granite", "termite"), which would make the
    # query head refuse harmless prompts.
    return write_tiny_checkpoint(
        folder, tokenizer_json=tokenizer_json, unsafe_token_ids=unsafe, unsafe_prompt_token_ids=unsafe[:1]
    )


def tiny_guard(
    tokenizer_json: str | os.PathLike[str],
    folder: str | os.PathLike[str] | None = None,
    *,
    device: str | None = None,
) -> StreamGuard:
    """The tiny demo guard, loaded: a random 2-layer Qwen3Guard-Stream in the
    real on-disk layout, wired so that answers saying " dynamite" are flagged
    (its two tokens are Unsafe, every other token Safe) and prompts saying it
    are Unsafe (every other prompt Safe). Its verdicts are MEANINGLESS: it
    shows the pipeline, not what the real guard judges.

    ``tokenizer_json``: the Qwen3 tokenizer.json (offline:
    ``adapter.bundled_tokenizers.qwen3_tokenizer_path()``). ``folder``: where
    the checkpoint is written (kept, e.g. for processes that load it again);
    by default a temporary folder, removed once the guard is loaded.
    ``device`` defaults to the CPU (its matrices are too small for a GPU to help).
    """
    from guard.stream_guard import StreamGuard

    with tempfile.TemporaryDirectory(prefix="crossguard-tiny-guard-", ignore_cleanup_errors=True) as temporary:
        written = write_tiny_guard(temporary if folder is None else folder, tokenizer_json=tokenizer_json)
        guard = StreamGuard.from_pretrained(written, device=device or "cpu")
    guard.source = "tiny demo guard (MEANINGLESS verdicts)"
    return guard
