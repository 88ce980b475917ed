"""Attention of a step's new tokens over the KV pool (``guard.kv_pool``).

Two ways, both reading a layer's keys and values ``[capacity, kv_heads,
head_dim]`` as the pool holds them, after the step wrote its new tokens:

* ``GatheredAttention``: every token row of the step in one call, whatever
  session it belongs to. Row r reads the ``span`` slots from its region's
  base (one gather, ``span`` fixed for the step) and a mask keeps the first
  ``length[r]`` of them: its session's cached positions up to and including
  itself (so the rows of one session's several new tokens are causal). Query
  heads are grouped by key/value head, ``[rows, kv_heads, group, head_dim]``,
  so the keys are not repeated per query head. No Python loop over sessions;
  the shapes depend only on (rows, span), so a CUDA graph can hold it.
  On CUDA the runner takes ``guard.decode_attention.TritonDecodeAttention``
  instead where it can (the same interface): a kernel that reads the pool in
  place, where the gather copies every row's ``span`` slots first and SDPA
  reads the copy (about three times the KV traffic).
* ``attend_in_place``: one session's new tokens over its own slice of the
  pool, no copy; causal among the new tokens. For prompt chunks, and on the
  CPU for every row, where the batched call gains nothing (``guard.runner``).
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

__all__ = ["GatheredAttention", "attend_in_place", "attention_backends"]

#: Rows x span gathered at once: a bound on the gather's memory (keys and
#: values of 262,144 positions: 1 GiB for the 0.6B guard in bf16).
GATHER_POSITIONS = 1 << 18


def attention_backends(device: torch.device) -> contextlib.AbstractContextManager:
    """On CUDA, keep SDPA off its cuDNN backend: cuDNN builds an execution plan
    per shape, and a KV cache that grows by a token per step is a new shape at
    every step (profiled on an H100 with transformers 5.17: 29 ms of CPU per
    attention call, 91% of a step, while the GPU worked 0.3 ms)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class GatheredAttention:
    """Attention of ``rows`` token rows, each over ``length[r]`` positions of
    the pool from ``base[r]``; built once per step, called once per layer."""

    def __init__(self, base: torch.Tensor, length: torch.Tensor, span: int, capacity: int) -> None:
        offsets = torch.arange(span, device=base.device)
        # Slots past the storage's end are clamped: masked anyway.
        self.index = (base[:, None] + offsets).clamp_(max=capacity - 1)
        self.mask = (offsets < length[:, None])[:, None, None, :]
        self.rows, self.span = base.shape[0], span
        self.group_rows = max(1, GATHER_POSITIONS // span)

    def __call__(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
        """``query`` ``[rows, heads, head_dim]`` → ``[rows, heads * head_dim]``."""
        rows, heads, head_dim = query.shape
        kv_heads = keys.shape[1]
        grouped = query.view(rows, kv_heads, heads // kv_heads, head_dim)
        outputs = []
        for first in range(0, rows, self.group_rows):  # groups of rows, not sessions: bounds the gather's memory
            last = min(rows, first + self.group_rows)
            index = self.index[first:last].reshape(-1)
            shape = (last - first, self.span, kv_heads, head_dim)
            # [rows, span, kv_heads, head_dim] -> [rows, kv_heads, span, head_dim]
            gathered_keys = keys.index_select(0, index).view(shape).transpose(1, 2)
            gathered_values = values.index_select(0, index).view(shape).transpose(1, 2)
            attended = scaled_dot_product_attention(
                grouped[first:last], gathered_keys, gathered_values, attn_mask=self.mask[first:last], scale=scale
            )
            # reshape, not view: CUDA kernels may return another memory layout.
            outputs.append(attended.reshape(last - first, heads * head_dim))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def attend_in_place(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, base: int, start: int, scale: float
) -> torch.Tensor:
    """One session's ``count`` new tokens (``query`` ``[count, heads,
    head_dim]``, at positions ``start``..) over its slice of the pool from
    ``base``: ``[count, heads * head_dim]``."""
    count, heads, head_dim = query.shape
    kv_heads = keys.shape[1]
    end = base + start + count
    # [positions, kv_heads, head_dim] -> [1, kv_heads, positions, head_dim], a view
    own_keys = keys[base:end].transpose(0, 1)[None]
    own_values = values[base:end].transpose(0, 1)[None]
    if count == 1:  # a decode token sees everything: no mask; heads grouped by key/value head
        grouped = query.reshape(1, kv_heads, heads // kv_heads, head_dim)
        attended = scaled_dot_product_attention(grouped, own_keys, own_values, scale=scale)
        return attended.reshape(1, heads * head_dim)
    # The new tokens see the whole cache and, causally, each other.
    mask = torch.ones(count, start + count, dtype=torch.bool, device=query.device).tril(start)
    attended = scaled_dot_product_attention(
        query.transpose(0, 1)[None], own_keys, own_values, attn_mask=mask, scale=scale, enable_gqa=True
    )
    return attended[0].transpose(0, 1).reshape(count, heads * head_dim)
