"""StreamGuard: a Qwen3Guard-Stream checkpoint loaded without remote code."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from guard.config import GuardLabels, guard_labels
from guard.errors import CheckpointError
from guard.model import Qwen3GuardStream, guard_head_shapes
from guard.policy import Policy
from guard.session import GuardSession

__all__ = ["DEFAULT_GUARD", "StreamGuard"]

DEFAULT_GUARD = "Qwen/Qwen3Guard-Stream-0.6B"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve_folder(path_or_repo_id: str | os.PathLike[str], revision: str | None) -> Path:
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo_id)
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(f"{name!r} is not a checkpoint folder (and not a hub repo id like {DEFAULT_GUARD!r})")
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.txt", "*.jinja"]
    try:  # the user's cache first: works offline
        return Path(snapshot_download(name, revision=revision, allow_patterns=patterns, local_files_only=True))
    except HFValidationError as error:
        raise CheckpointError(f"{name!r} is neither a checkpoint folder nor a valid hub repo id: {error}") from error
    except LocalEntryNotFoundError:
        pass  # not cached: download it
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
    except (OSError, HfHubHTTPError) as error:  # offline, unreachable, no such repo, no access
        raise CheckpointError(
            f"could not load {name!r}: it is not in the local Hugging Face cache ({HF_HUB_CACHE}) and "
            f"downloading it failed ({type(error).__name__}: {error}). On a machine with internet run "
            f"`huggingface-cli download {name}` and copy the cache, or pass the path of a local "
            "checkpoint folder instead"
        ) from error


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing:
            raise CheckpointError(f"{folder} is missing the shards {', '.join(missing)} listed in {index.name}")
        return [folder / shard for shard in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{folder} has no model.safetensors (nor a model.safetensors.index.json for shards)")


def _read_state_dict(files: list[Path], dtype: torch.dtype | None, device: torch.device) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as shard:
            for key in shard.keys():
                tensor = shard.get_tensor(key)
                tensors[key] = tensor.to(device=device, dtype=dtype or tensor.dtype)
    return tensors


def _check_weights(
    tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], heads: dict[str, tuple[int, ...]]
) -> list[str]:
    """Refuse missing or misshapen tensors, naming them; return ignored keys."""
    missing_heads = [key for key in heads if key not in tensors]
    if missing_heads:
        hint = (
            " It holds an lm_head, so it looks like a Qwen3ForCausalLM export, which drops the guard heads."
            if "lm_head.weight" in tensors
            else ""
        )
        raise CheckpointError(
            f"the checkpoint lacks the guard head tensors {', '.join(missing_heads)}.{hint} "
            "Use the original Qwen3Guard-Stream weights; a head is never initialised at random"
        )
    missing = [key for key in expected if key not in tensors]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"the checkpoint lacks the backbone tensors {shown}")
    wrong = [
        f"{key} is {tuple(tensors[key].shape)}, expected {shape}"
        for key, shape in expected.items()
        if tuple(tensors[key].shape) != shape
    ]
    if wrong:
        raise CheckpointError("tensors of the wrong shape for config.json: " + "; ".join(wrong))
    return sorted(set(tensors) - set(expected))


class StreamGuard:
    """A loaded Qwen3Guard-Stream: model, config, label names and tokenizer."""

    def __init__(self, model: Qwen3GuardStream, tokenizer: Tokenizer, *, source: str = "") -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.source = source
        self.ignored_weights: list[str] = []
        vocabulary = tokenizer.get_vocab_size(with_added_tokens=True)
        if vocabulary > model.config.vocab_size or tokenizer.token_to_id("<|im_end|>") is None:
            raise CheckpointError(
                f"the tokenizer ({vocabulary} tokens) is not this guard's Qwen3 tokenizer "
                f"(the model has {model.config.vocab_size} embeddings and needs <|im_start|>/<|im_end|>); "
                "use the tokenizer.json that ships with the checkpoint"
            )
        self.vocab_size = vocabulary

    @property
    def config(self) -> Qwen3Config:
        return self.model.config

    @property
    def labels(self) -> GuardLabels:
        return self.model.labels

    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.embed_tokens.weight.dtype

    def kv_bytes_per_token(self) -> int:
        """2 (keys, values) × layers × kv_heads × head_dim × bytes per element."""
        config = self.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element

    def session(self, policy: Policy | None = None) -> GuardSession:
        """A new conversation."""
        return GuardSession(self, policy)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike[str] = DEFAULT_GUARD,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        revision: str | None = None,
    ) -> StreamGuard:
        """Load a checkpoint folder, or a hub repo id from the cache or the hub.

        ``dtype`` defaults to the dtype stored in the checkpoint; ``device`` to
        CUDA when present, else the CPU.
        """
        folder = _resolve_folder(path_or_repo_id, revision)
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{folder} has no config.json")
        raw_config: dict[str, Any] = json.loads(config_path.read_text())
        if raw_config.get("model_type") != "qwen3":
            raise CheckpointError(
                f"{config_path} has model_type {raw_config.get('model_type')!r}; Qwen3Guard-Stream is a 'qwen3' model"
            )
        labels = guard_labels(raw_config, where=str(config_path))
        config = Qwen3Config.from_dict(raw_config)
        config._attn_implementation = "sdpa"
        if isinstance(dtype, str):
            dtype = _DTYPES[dtype]
        target = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")

        tensors = _read_state_dict(_weight_files(folder), dtype, target)
        with torch.device("meta"):
            model = Qwen3GuardStream(config, labels)
        expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
        ignored = _check_weights(tensors, expected, guard_head_shapes(config, labels))
        model.load_state_dict({key: tensors[key] for key in expected}, strict=True, assign=True)
        # Non-persistent buffers (the rotary frequencies) are computed, not loaded.
        with torch.device(target):
            model.model.rotary_emb = Qwen3RotaryEmbedding(config)

        tokenizer_path = folder / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise CheckpointError(f"{folder} has no tokenizer.json (the guard's Qwen3 tokenizer)")
        guard = cls(model, Tokenizer.from_file(str(tokenizer_path)), source=str(path_or_repo_id))
        guard.ignored_weights = ignored
        return guard
