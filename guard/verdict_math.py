"""Logits to the numbers of verdicts, for every row of a step at once, on the device.

Upstream's arithmetic (``Policy.arithmetic``): ``F.softmax`` on bfloat16
logits gives bfloat16 probabilities and ``torch.max`` takes the first of
equal maxima, so classes whose probabilities round to the same bf16 value go
to the lower index. Otherwise softmax and argmax in float32. Rows of one step
may belong to sessions of different policies: ``upstream`` is then a bool
per row and both are computed (a few classes per row: nothing to save).
"""

from __future__ import annotations

import torch

from guard.model import GuardLogits

__all__ = ["COLUMNS", "best_class", "verdict_columns"]

#: The columns of ``verdict_columns``: risk level index and probability, category index and probability.
COLUMNS = 4


def best_class(logits: torch.Tensor, upstream: bool | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probability as float32, index) of the most likely class of each row."""
    if isinstance(upstream, bool):
        probabilities = torch.softmax(logits.to(torch.bfloat16) if upstream else logits.float(), dim=-1)
        best = probabilities.max(dim=-1)
        return best.values.float(), best.indices
    in_bf16 = torch.softmax(logits.to(torch.bfloat16), dim=-1).max(dim=-1)
    in_fp32 = torch.softmax(logits.float(), dim=-1).max(dim=-1)
    return (
        torch.where(upstream, in_bf16.values.float(), in_fp32.values),
        torch.where(upstream, in_bf16.indices, in_fp32.indices),
    )


def verdict_columns(logits: GuardLogits, upstream: bool | torch.Tensor) -> torch.Tensor:
    """``[rows, 4]`` float32: risk level index, its probability, category
    index, its probability (indices are small integers, exact in float32)."""
    risk_prob, risk_index = best_class(logits.risk_level, upstream)
    category_prob, category_index = best_class(logits.category, upstream)
    return torch.stack([risk_index.float(), risk_prob, category_index.float(), category_prob], dim=1)
