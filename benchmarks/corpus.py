"""A long, real-looking, mixed-script text for benchmarks (deterministic)."""

from __future__ import annotations

import random

PARAGRAPHS = [
    "Sure! Here's a step-by-step answer. First, preheat the oven to 220 °C (428 °F); "
    "then mix 250 g of flour with 2 eggs. Don't over-mix: it'll get tough.\n\n",
    "```python\ndef fib(n: int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n```\n",
    "| Year | Revenue | Δ |\n|------|---------|---|\n| 2023 | $1,204.50 | +3.2% |\n| 2024 | $1,389.75 | +15.4% |\n",
    "人工智能正在改变我们的生活方式。今天的天气很好，我们去公园散步吧！",
    "日本語のテキストも含まれています。東京は大きな都市です。",
    "한국어 문장도 있습니다. 서울은 아름다운 도시입니다.",
    "مرحبا بالعالم! هذه جملة باللغة العربية.",
    "Привет, мир! Это предложение на русском языке.",
    "नमस्ते दुनिया, यह हिंदी में एक वाक्य है।",
    "Emoji time: 👍🏽 👨‍👩‍👧‍👦 ❤️ 🤖 🇫🇷 — and a café, naïve résumé, Ångström.\r\n",
    "Math: ∑ᵢ xᵢ² ≤ ∞, α + β = γ; 3.14159 × 2 = 6.28318.\n",
    "  - item one\n  - item two\n\n    indented block\t\twith tabs\n",
    "He said \u201cwe\u2019re done\u201d, and she replied: \u2018not yet\u2019\u2026\n",
    "Combining marks: e\u0301 o\u0308 a\u0323\u0302 and jamo \u1100\u1161\u11a8 \u1112\u1161\u11ab.\n",
]


# "chat": mostly Latin-script answers (prose, code, a table, emoji) with some
# other scripts, as a chat product sees them. "prose": running text only, no
# code or tables (long punctuation and indentation runs are single pre-tokens
# of many ids). "scripts": every paragraph equally often, so CJK, Hangul,
# Arabic and Devanagari make up half the text; their words are long
# pre-tokens, so even the unavoidable hold-back is larger there.
MIXES = {
    "chat": [6, 3, 2, 1, 1, 1, 1, 1, 1, 3, 2, 2, 6, 1],
    "prose": [6, 0, 0, 1, 1, 1, 1, 1, 1, 2, 0, 0, 6, 1],
    "scripts": [1] * len(PARAGRAPHS),
}


def mixed_text(length: int, seed: int = 0, mix: str = "chat") -> str:
    """At least ``length`` characters of shuffled prose, code, tables and scripts."""
    rng = random.Random(seed)
    parts: list[str] = []
    total = 0
    while total < length:
        paragraph = rng.choices(PARAGRAPHS, weights=MIXES[mix])[0]
        parts.append(paragraph if paragraph.endswith(("\n", " ")) else paragraph + " ")
        total += len(parts[-1])
    return "".join(parts)
