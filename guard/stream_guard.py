"""StreamGuard: a Qwen3Guard-Stream checkpoint loaded without remote code."""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from guard.config import GuardLabels, check_backbone_fields, guard_labels
from guard.errors import CheckpointError, DtypeError
from guard.model import Qwen3GuardStream, guard_head_shapes
from guard.policy import Policy
from guard.runner import ModelRunner
from guard.session import GuardSession

__all__ = ["DEFAULT_GUARD", "StreamGuard"]

DEFAULT_GUARD = "Qwen/Qwen3Guard-Stream-0.6B"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SUPPORTED = "'float32', 'bfloat16' or 'float16' (or the torch dtype)"
_DTYPE_SHORTHANDS = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
# safetensors' names of the dtypes a usable checkpoint stores
_STORED = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_USE_ORIGINAL = f"use the original bf16 checkpoint (e.g. {DEFAULT_GUARD})"
# Tensors only a quantized copy holds: FP8 scales (weight_scale, weight_scale_inv,
# input_scale), bitsandbytes state (absmax, quant_map, quant_state, SCB), GPTQ/AWQ
# packing. An FP8 copy keeps the float shapes, so only these betray it.
_QUANTIZATION_TENSOR = re.compile(r"scale|absmax|quant_map|quant_state|qweight|qzeros|g_idx|\.SCB$")


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
            f"`hf download {name}` and copy the cache, or pass the path of a local "
            "checkpoint folder instead"
        ) from error


def _requested_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """Check ``dtype`` before anything is read; None (or "auto") means the checkpoint's own."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    name = dtype.removeprefix("torch.") if isinstance(dtype, str) else None
    if name in _DTYPES:
        return _DTYPES[name]
    if name in _DTYPE_SHORTHANDS:
        full = _DTYPE_SHORTHANDS[name]
        raise DtypeError(f"dtype {dtype!r} is a shorthand from_pretrained does not take; pass {full!r}")
    as_torch = dtype if isinstance(dtype, torch.dtype) else getattr(torch, name or "", None)
    if isinstance(as_torch, torch.dtype) and as_torch.is_floating_point:
        raise DtypeError(f"the guard does not run in {as_torch}; pass {_SUPPORTED}, float32 being the most exact")
    if isinstance(as_torch, torch.dtype):
        raise DtypeError(
            f"{as_torch} is not a floating-point dtype and crossguard does not quantize the guard; pass {_SUPPORTED}"
        )
    raise DtypeError(f"dtype {dtype!r} is not a dtype from_pretrained knows; pass {_SUPPORTED}")


def _read_config(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(
            f"{path} is not valid JSON ({error}); download the checkpoint's config.json again"
        ) from error
    if not isinstance(raw, dict):
        raise CheckpointError(
            f"{path} holds a JSON {type(raw).__name__}, not an object of config fields; "
            "download the checkpoint's config.json again"
        )
    return raw


def _refuse_quantization_config(raw: dict[str, Any], path: Path) -> None:
    quantization = raw.get("quantization_config")
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        found = f"a quantization_config (quant_method {method!r})" if method else "a quantization_config"
        raise CheckpointError(
            f"{path} has {found}: a quantized copy of the guard, whose weights crossguard would run without "
            f"their scales and so judge garbage; {_USE_ORIGINAL}"
        )


def _qwen3_config(raw: dict[str, Any], path: Path) -> Qwen3Config:
    check_backbone_fields(raw, where=str(path))
    try:
        return Qwen3Config.from_dict(raw)
    except (StrictDataclassError, TypeError, ValueError) as error:
        detail = " ".join(line.strip() for line in str(error).splitlines())
        raise CheckpointError(
            f"{path} does not describe a valid Qwen3 model ({detail}); "
            "correct that field, or use the original checkpoint's config.json"
        ) from error


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
            raise CheckpointError(f"{index} is not a valid shard index ({error}); download it again") from error
        if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
            raise CheckpointError(f"{index} has no weight_map from tensor names to shard files; download it again")
        shards = sorted(set(weight_map.values()))
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing:
            raise CheckpointError(f"{folder} is missing the shards {', '.join(missing)} listed in {index.name}")
        return [folder / shard for shard in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{folder} has no model.safetensors (nor a model.safetensors.index.json for shards)")


@dataclass(frozen=True, slots=True)
class _StoredTensor:
    file: Path
    dtype: str  # safetensors' name: F32, BF16, F8_E4M3, U8, ...
    shape: tuple[int, ...]


def _unreadable(file: Path, error: Exception) -> CheckpointError:
    return CheckpointError(
        f"{file} is not a readable safetensors file ({error}): it is probably truncated or damaged, "
        "e.g. by an interrupted download or copy; download it again"
    )


def _stored_tensors(files: list[Path]) -> dict[str, _StoredTensor]:
    """What every shard holds, from the headers alone: nothing is loaded
    before the whole checkpoint has been checked."""
    stored: dict[str, _StoredTensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as shard:
                slices = {key: shard.get_slice(key) for key in shard.keys()}
                entries = {key: (part.get_dtype(), tuple(part.get_shape())) for key, part in slices.items()}
        except (SafetensorError, OSError) as error:
            raise _unreadable(file, error) from error
        for key, (dtype, shape) in entries.items():
            if key in stored:
                raise CheckpointError(
                    f"the tensor {key} is in two shards, {stored[key].file.name} and {file.name}, so it is "
                    "unclear which copy is meant; download the checkpoint again"
                )
            stored[key] = _StoredTensor(file, dtype, shape)
    return stored


def _some(keys: list[str]) -> str:
    return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def _refuse_quantized(stored: dict[str, _StoredTensor], expected: dict[str, tuple[int, ...]]) -> None:
    unsupported = sorted(key for key, tensor in stored.items() if tensor.dtype not in _STORED)
    if unsupported:
        kinds = sorted({stored[key].dtype for key in unsupported})
        raise CheckpointError(
            f"the checkpoint stores tensors as {', '.join(kinds)} ({_some(unsupported)}), not as float32, bfloat16 "
            f"or float16: a quantized or converted copy, which crossguard cannot run; {_USE_ORIGINAL}"
        )
    extra = sorted(key for key in stored if key not in expected and _QUANTIZATION_TENSOR.search(key))
    if extra:
        raise CheckpointError(
            f"the checkpoint holds quantization tensors ({_some(extra)}) that the guard would silently ignore, "
            f"running the weights without them: a quantized copy; {_USE_ORIGINAL}"
        )


def _check_weights(
    shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], heads: dict[str, tuple[int, ...]]
) -> list[str]:
    """Refuse missing or misshapen tensors, naming them; return ignored keys."""
    missing_heads = [key for key in heads if key not in shapes]
    if missing_heads:
        hint = (
            " It holds an lm_head, so it looks like a Qwen3ForCausalLM export, which drops the guard heads."
            if "lm_head.weight" in shapes
            else ""
        )
        raise CheckpointError(
            f"the checkpoint lacks the guard head tensors {', '.join(missing_heads)}.{hint} "
            "Use the original Qwen3Guard-Stream weights; a head is never initialised at random"
        )
    missing = [key for key in expected if key not in shapes]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"the checkpoint lacks the backbone tensors {shown}")
    wrong = [f"{key} is {shapes[key]}, expected {shape}" for key, shape in expected.items() if shapes[key] != shape]
    if wrong:
        raise CheckpointError("tensors of the wrong shape for config.json: " + "; ".join(wrong))
    return sorted(set(shapes) - set(expected))


def _load_dtype(
    stored: dict[str, _StoredTensor], keys: list[str], raw_config: dict[str, Any], where: str
) -> torch.dtype:
    """The dtype to load in when none was asked for: the stored one; if the
    tensors disagree, the one config.json declares (what transformers' "auto"
    reads), else none."""
    kinds = {stored[key].dtype for key in keys}
    if len(kinds) == 1:
        return _STORED[kinds.pop()]
    declared = raw_config.get("dtype") or raw_config.get("torch_dtype")
    if isinstance(declared, str) and declared in _DTYPES:
        return _DTYPES[declared]
    by_shard: dict[str, set[str]] = {}
    for key in keys:
        by_shard.setdefault(stored[key].file.name, set()).add(str(_STORED[stored[key].dtype]).removeprefix("torch."))
    shown = "; ".join(f"{name}: {', '.join(sorted(found))}" for name, found in sorted(by_shard.items()))
    raise CheckpointError(
        f"the checkpoint's tensors are stored in different dtypes ({shown}) and {where} declares no dtype to "
        "convert them to; pass dtype='bfloat16' (or 'float32', 'float16') to from_pretrained to convert them all"
    )


def _read_tensors(
    stored: dict[str, _StoredTensor], keys: list[str], dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[str]] = {}
    for key in keys:
        by_file.setdefault(stored[key].file, []).append(key)
    tensors = {}
    for file, file_keys in by_file.items():
        try:
            with safe_open(str(file), framework="pt") as shard:
                for key in file_keys:
                    tensors[key] = shard.get_tensor(key).to(device=device, dtype=dtype)
        except (SafetensorError, OSError) as error:
            raise _unreadable(file, error) from error
    return tensors


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
        self._runner: ModelRunner | None = None
        self._runner_lock = threading.Lock()

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

    def _session_runner(self) -> ModelRunner:
        """The runner of this guard's plain sessions (made on first use): one
        KV pool and one set of CUDA graphs for all of them, one step at a time.
        Serving many conversations at once is a ``GuardEngine``'s work."""
        with self._runner_lock:
            if self._runner is None:
                self._runner = ModelRunner(self)
            return self._runner

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

        ``dtype`` ("float32", "bfloat16", "float16" or the torch dtype)
        defaults to the dtype stored in the checkpoint; when its tensors are
        stored in more than one dtype, to the dtype config.json declares
        (they are all converted to it), and with none declared the checkpoint
        is refused, naming each shard's dtypes. ``device`` defaults to CUDA
        when present, else the CPU.
        """
        requested = _requested_dtype(dtype)
        folder = _resolve_folder(path_or_repo_id, revision)
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{folder} has no config.json")
        raw_config = _read_config(config_path)
        if raw_config.get("model_type") != "qwen3":
            raise CheckpointError(
                f"{config_path} has model_type {raw_config.get('model_type')!r}; Qwen3Guard-Stream is a 'qwen3' model"
            )
        _refuse_quantization_config(raw_config, config_path)
        labels = guard_labels(raw_config, where=str(config_path))
        config = _qwen3_config(raw_config, config_path)
        config._attn_implementation = "sdpa"
        target = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")

        with torch.device("meta"):
            model = Qwen3GuardStream(config, labels)
        expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
        # Every check runs on the shards' headers before any tensor is read.
        stored = _stored_tensors(_weight_files(folder))
        _refuse_quantized(stored, expected)
        shapes = {key: tensor.shape for key, tensor in stored.items()}
        ignored = _check_weights(shapes, expected, guard_head_shapes(config, labels))
        keys = list(expected)
        load_dtype = requested or _load_dtype(stored, keys, raw_config, config_path.name)
        tensors = _read_tensors(stored, keys, load_dtype, target)
        model.load_state_dict(tensors, strict=True, assign=True)
        # Non-persistent buffers (the rotary frequencies) are computed, not loaded.
        with torch.device(target):
            model.model.rotary_emb = Qwen3RotaryEmbedding(config)

        tokenizer_path = folder / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise CheckpointError(f"{folder} has no tokenizer.json (the guard's Qwen3 tokenizer)")
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
        except Exception as error:  # tokenizers raises a bare Exception for a damaged file
            raise CheckpointError(
                f"{tokenizer_path} is not a readable tokenizer ({error}); "
                "download the checkpoint's tokenizer.json again"
            ) from error
        guard = cls(model, tokenizer, source=str(path_or_repo_id))
        guard.ignored_weights = ignored
        return guard
