"""Incremental, stable re-tokenization into the guard's vocabulary."""

from adapter.retokenize.ordinary import OrdinaryTokenizer, encode_ordinary, ordinary_tokenizer
from adapter.retokenize.stable import StableRetokenizer, StableToken

__all__ = ["OrdinaryTokenizer", "StableRetokenizer", "StableToken", "encode_ordinary", "ordinary_tokenizer"]
