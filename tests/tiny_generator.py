"""The tiny real generator the integration tests drive: a 2-layer Llama with
the Mistral v1 (Llama-2 style, byte fallback) vocabulary and random weights,
which really runs ``generate``."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor


def tiny_mistral_vocabulary_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


class Scripted(LogitsProcessor):
    """A real generator that says what it is told: the model runs every
    step, the processor picks the token (then ``end``, once the script is
    over). It records the prompt it was given. With ``retry``, a step the
    generator has already passed (it was rolled back and regenerates, the
    CARE pattern) follows ``retry`` instead."""

    def __init__(self, prompt_length: int, script: list[int], end: int = 2, *, retry: list[int] | None = None):
        self.prompt_length, self.script, self.end, self.retry = prompt_length, script, end, retry
        self.prompt: list[int] | None = None
        self.longest = 0

    def __call__(self, input_ids, scores):
        if self.prompt is None:
            self.prompt = input_ids[0, : self.prompt_length].tolist()
        step = input_ids.shape[1] - self.prompt_length
        script = self.script if self.retry is None or self.longest <= step else self.retry
        self.longest = max(self.longest, step + 1)
        forced = torch.full_like(scores, -1e9)
        forced[:, script[step] if step < len(script) else self.end] = 0.0
        return forced
