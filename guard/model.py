"""Qwen3Guard-Stream as a plain transformers 5 module, and its KV cache.

The parameter names are those of the released checkpoints (``model.*`` for the
Qwen3 backbone, eight head tensors at the top level), so their safetensors
load as they are. No ``trust_remote_code``: the backbone is transformers' own
``Qwen3Model``; the heads are ``head(rmsnorm(pre(h)))`` on the final normed
hidden state at every position, with no activation.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import Qwen3Config
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.models.qwen3.modeling_qwen3 import Qwen3Model, Qwen3RMSNorm

from guard.config import GuardLabels

__all__ = ["GrowableCacheLayer", "GuardLogits", "Qwen3GuardStream", "guard_head_shapes", "new_cache"]


# transformers 5 renamed Qwen3Model.forward's ``past_key_values`` to ``cache``
# (5.2x; the old name is removed later). Passing the wrong one is not an error:
# it lands in **kwargs and the model runs without the cache.
_CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(Qwen3Model.forward).parameters else "past_key_values"


def _attention_backends(device: torch.device) -> contextlib.AbstractContextManager:
    """On CUDA, keep SDPA off its cuDNN backend: cuDNN builds an execution plan
    per shape, and a KV cache that grows by a token per step is a new shape at
    every step (profiled on an H100 with transformers 5.17: 29 ms of CPU per
    attention call, 91% of a step, while the GPU worked 0.3 ms)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def guard_head_shapes(config: Qwen3Config, labels: GuardLabels) -> dict[str, tuple[int, ...]]:
    """The eight head tensors of a real checkpoint and their shapes."""
    hidden, inner = config.hidden_size, labels.inner_size
    shapes = {}
    for prefix, risk_levels, categories in (
        ("", labels.risk_levels, labels.categories),
        ("query_", labels.query_risk_levels, labels.query_categories),
    ):
        shapes[f"{prefix}risk_level_category_pre.weight"] = (inner, hidden)
        shapes[f"{prefix}risk_level_category_layernorm.weight"] = (inner,)
        shapes[f"{prefix}risk_level_head.weight"] = (len(risk_levels), inner)
        shapes[f"{prefix}category_head.weight"] = (len(categories), inner)
    return shapes


@dataclass(frozen=True, slots=True)
class GuardLogits:
    """Per-position logits, shape ``[positions, classes]``."""

    risk_level: torch.Tensor
    category: torch.Tensor


class Qwen3GuardStream(nn.Module):
    def __init__(self, config: Qwen3Config, labels: GuardLabels) -> None:
        super().__init__()
        self.config = config
        self.labels = labels
        hidden, inner, eps = config.hidden_size, labels.inner_size, config.rms_norm_eps
        self.model = Qwen3Model(config)
        self.risk_level_category_pre = nn.Linear(hidden, inner, bias=False)
        self.risk_level_category_layernorm = Qwen3RMSNorm(inner, eps=eps)
        self.risk_level_head = nn.Linear(inner, len(labels.risk_levels), bias=False)
        self.category_head = nn.Linear(inner, len(labels.categories), bias=False)
        self.query_risk_level_category_pre = nn.Linear(hidden, inner, bias=False)
        self.query_risk_level_category_layernorm = Qwen3RMSNorm(inner, eps=eps)
        self.query_risk_level_head = nn.Linear(inner, len(labels.query_risk_levels), bias=False)
        self.query_category_head = nn.Linear(inner, len(labels.query_categories), bias=False)

    def hidden_states(self, input_ids: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        """Final normed hidden states ``[batch, positions, hidden]``; appends to ``cache``."""
        if cache is None:
            return self.model(input_ids=input_ids, use_cache=False).last_hidden_state
        before = cache.get_seq_length()
        with _attention_backends(input_ids.device):
            output = self.model(input_ids=input_ids, **{_CACHE_ARGUMENT: cache}, use_cache=True)
        if cache.get_seq_length() != before + input_ids.shape[-1]:
            # A model that silently ignored the cache would judge every
            # append without its context: refuse rather than give verdicts.
            raise RuntimeError(
                f"transformers {transformers.__version__} did not use the guard's KV cache; "
                "install a transformers 5 release that crossguard supports (see pyproject.toml)"
            )
        return output.last_hidden_state

    def response_logits(self, hidden: torch.Tensor) -> GuardLogits:
        projected = self.risk_level_category_layernorm(self.risk_level_category_pre(hidden))
        return GuardLogits(self.risk_level_head(projected), self.category_head(projected))

    def query_logits(self, hidden: torch.Tensor) -> GuardLogits:
        projected = self.query_risk_level_category_layernorm(self.query_risk_level_category_pre(hidden))
        return GuardLogits(self.query_risk_level_head(projected), self.query_category_head(projected))

    def forward(self, input_ids: torch.Tensor) -> tuple[GuardLogits, GuardLogits]:
        """One uncached pass over whole sequences: (response, query) logits at
        every position. The reference that cached sessions must match."""
        hidden = self.hidden_states(input_ids, cache=None)
        return self.response_logits(hidden), self.query_logits(hidden)


class GrowableCacheLayer(CacheLayerMixin):
    """One layer's keys and values in a preallocated buffer that grows by an
    eighth (at least ``min_growth`` positions) when full.

    transformers' DynamicLayer concatenates at every step, copying the whole
    cache per token, and its crop keeps the cropped storage alive as a view.
    Here appending writes in place (amortised O(1)), ``keys``/``values`` are
    views of the used part, and cropping far below the capacity reallocates so
    the memory is given back.
    """

    is_croppable = True
    is_sliding = False

    def __init__(self, min_growth: int = 256) -> None:
        super().__init__()
        self.min_growth = min_growth
        self.length = 0
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    @property
    def capacity(self) -> int:
        return 0 if self._key_buffer is None else self._key_buffer.shape[-2]

    def _reallocate(self, capacity: int, like: torch.Tensor) -> None:
        batch, heads, _, dim = like.shape
        keys = like.new_empty((batch, heads, capacity, dim))
        values = like.new_empty((batch, heads, capacity, dim))
        if self.length:
            keys[..., : self.length, :] = self._key_buffer[..., : self.length, :]
            values[..., : self.length, :] = self._value_buffer[..., : self.length, :]
        self._key_buffer, self._value_buffer = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            self._reallocate(max(end, self.capacity + max(self.min_growth, self.capacity // 8)), key_states)
        self._key_buffer[..., self.length : end, :] = key_states
        self._value_buffer[..., self.length : end, :] = value_states
        self.length = end
        self.keys = self._key_buffer[..., :end, :]
        self.values = self._value_buffer[..., :end, :]
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes the negative number of positions to remove")
        self.length = max(self.length + tokens_to_remove, 0)
        if self._key_buffer is None:
            return
        if self.capacity - self.length > max(self.min_growth, self.length // 4):
            self._reallocate(self.length + self.min_growth, self._key_buffer)
        self.keys = self._key_buffer[..., : self.length, :]
        self.values = self._value_buffer[..., : self.length, :]

    def rewind(self, length: int) -> None:
        """Forget the positions from ``length`` on, keeping the buffers as they
        are. It allocates nothing, because it undoes a step that failed,
        perhaps for want of memory; a buffer that grew during that step keeps
        the earlier positions (growth copies them), so nothing else to undo."""
        self.length = length
        if self._key_buffer is not None:
            self.keys = self._key_buffer[..., :length, :]
            self.values = self._value_buffer[..., :length, :]

    def reset(self) -> None:
        self.length = 0
        self._key_buffer = self._value_buffer = None
        self.keys = self.values = None
        self.is_initialized = False

    def allocated_bytes(self) -> int:
        if self._key_buffer is None:
            return 0
        return self._key_buffer.nbytes + self._value_buffer.nbytes

    def used_bytes(self) -> int:
        if self._key_buffer is None:
            return 0
        per_position = self._key_buffer.nbytes // self.capacity
        return 2 * per_position * self.length


def new_cache(config: Qwen3Config) -> Cache:
    return Cache(layers=[GrowableCacheLayer() for _ in range(config.num_hidden_layers)])
