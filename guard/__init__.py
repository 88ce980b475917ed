"""Qwen3Guard-Stream on transformers 5 with a KV-cached, rollback-capable session."""
