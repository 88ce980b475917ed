"""Qwen3Guard-Stream as a plain transformers 5 module.

The parameter names are those of the released checkpoints (``model.*`` for the
Qwen3 backbone, eight head tensors at the top level), so their safetensors
load as they are. No ``trust_remote_code``: the backbone is transformers' own
``Qwen3Model``; the heads are ``head(rmsnorm(pre(h)))`` on the final normed
hidden state at every position, with no activation.

``forward`` is the uncached reference over whole sequences (upstream's way);
sessions run the same modules and weights step by step over a KV pool
(``guard.runner``), and are tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3Model, Qwen3RMSNorm

from guard.config import GuardLabels

__all__ = ["GuardLogits", "Qwen3GuardStream", "guard_head_shapes"]


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

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final normed hidden states ``[batch, positions, hidden]``, uncached."""
        return self.model(input_ids=input_ids, use_cache=False).last_hidden_state

    def response_logits(self, hidden: torch.Tensor) -> GuardLogits:
        projected = self.risk_level_category_layernorm(self.risk_level_category_pre(hidden))
        return GuardLogits(self.risk_level_head(projected), self.category_head(projected))

    def query_logits(self, hidden: torch.Tensor) -> GuardLogits:
        projected = self.query_risk_level_category_layernorm(self.query_risk_level_category_pre(hidden))
        return GuardLogits(self.query_risk_level_head(projected), self.query_category_head(projected))

    def forward(self, input_ids: torch.Tensor) -> tuple[GuardLogits, GuardLogits]:
        """One uncached pass over whole sequences: (response, query) logits at
        every position. The reference that cached sessions must match."""
        hidden = self.hidden_states(input_ids)
        return self.response_logits(hidden), self.query_logits(hidden)
