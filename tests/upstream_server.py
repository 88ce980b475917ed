"""The tests' OpenAI-compatible upstream: the tiny real generator behind
``crossguard serve --demo-upstream``, which lives in the package
(``integrations.demo_upstream``); its names are re-exported here for the
tests and benchmarks that import them from this module."""

from integrations.demo_upstream import (
    BOS,
    END_HEADER,
    END_OF_TEXT,
    EOT,
    MODEL_NAME,
    START_HEADER,
    STOP_IDS,
    UpstreamServer,
    llama3_tokenizer,
    render_llama3_chat,
    tiny_llama3,
)

__all__ = [
    "BOS",
    "END_HEADER",
    "END_OF_TEXT",
    "EOT",
    "MODEL_NAME",
    "START_HEADER",
    "STOP_IDS",
    "UpstreamServer",
    "llama3_tokenizer",
    "render_llama3_chat",
    "tiny_llama3",
]
