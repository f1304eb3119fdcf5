"""Built-in prompts for logit parity and a corpus for tokenizer parity.

Prompts are short and multilingual so one parity run exercises several scripts (Latin, CJK, Cyrillic,
Arabic), code and digits: byte-fallback and merge differences show up as logit or tokenizer mismatches
rather than hiding behind English. They are encoded with the *source* tokenizer, so every runner sees the
same ids.
"""

# The texts are deliberately non-ASCII; RUF001 (confusable characters) would flag every one of them.
# ruff: noqa: RUF001

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sovpack.errors import ParityError, UsageError
from sovpack.source.tokenizer import load_tokenizer

DEFAULT_MAX_PROMPT_TOKENS = 48
DEFAULT_MAX_NEW_TOKENS = 8  # greedy tokens compared per prompt

# label -> text; insertion order is the report's prompt order.
LABELED_PROMPTS: dict[str, str] = {
    "english": "The quick brown fox jumps over the lazy dog because",
    "french": "Il était une fois, dans un petit village au bord de la mer,",
    "german": "Die Straßenbahn fährt über die Brücke, während die Kinder",
    "chinese": "从前有一座山，山里有一座庙，庙里有一个老和尚",
    "russian": "Москва — столица России, и каждый год сюда приезжают",
    "arabic": "في صباح يوم مشمس، خرج الأطفال إلى الحديقة",
    "code": "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return",
    "numbers": "2 + 2 = 4, 12 * 12 = 144, 3.14159 * 2 = 6.28318, and 1000000 / 8 =",
}
PROMPTS: list[str] = list(LABELED_PROMPTS.values())
PROMPT_LABELS: list[str] = list(LABELED_PROMPTS)

# Texts whose encodings must match between the source tokenizer and an artifact's own tokenizer. Each covers
# something converters get wrong: pre-tokenizer splits, byte fallback, whitespace handling, special tokens.
TOKENIZER_CORPUS: list[str] = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "multiple   spaces    here",
    "tab\tseparated\tvalues",
    "line one\nline two\n\nline four",
    "\n\n\n",
    "    indented with four spaces",
    "\t\tdouble tab",
    "mixed \t \n whitespace \r\n run",
    "Ça va? Déjà vu, naïve café, señor, Übermaß.",
    "Die Größe der Straße ist außergewöhnlich.",
    "你好，世界！今天天气很好。",
    "日本語のテキストとカタカナ、ひらがな。",
    "한국어 문장입니다.",
    "Привет, мир! Съешь же ещё этих мягких булок.",
    "مرحبا بالعالم، كيف حالك؟",
    "שלום עולם",
    "नमस्ते दुनिया",
    "Γειά σου Κόσμε",
    "0123456789",
    "3.14159265358979 2.718281828 1e-10 -42 +7",
    "12,345,678.90 and 1 000 000",
    "Phone: +1 (555) 123-4567, ZIP 90210",
    "def main():\n    print('hi')\n    return 0\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "const x = {a: 1, 'b': [2, 3], \"c\": null};",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "https://example.com/path?query=1&other=two#frag",
    "user@example.com",
    "emoji: 😀🎉🚀 and 👨‍👩‍👧‍👦 family, flags 🇫🇷🇩🇪",
    "math: ∑ ∫ √ ∞ ≤ ≥ ≠ α β γ",
    "<|im_start|>user\nHi there<|im_end|>",
    "<s>[INST] Hello [/INST]</s>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>",
    "<|endoftext|>",
    "<bos><start_of_turn>user\nhello<end_of_turn>",
    "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>",
    "a" * 40,
    "ThisIsCamelCaseAndSnake_case_identifiers",
    "don't won't it's I'm you're we've they'll",
]


def encode_prompts(
    tokenizer_json: Path,
    prompts: Sequence[str] | None = None,
    *,
    max_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
) -> list[list[int]]:
    """Token ids of each prompt as the model expects them (with BOS), capped at ``max_tokens`` for speed."""
    texts = list(PROMPTS) if prompts is None else list(prompts)
    if not texts:
        raise UsageError("no prompts to encode")
    if max_tokens < 1:
        raise UsageError(f"max_tokens must be at least 1, got {max_tokens}")
    tokenizer = load_tokenizer(tokenizer_json)
    encoded: list[list[int]] = []
    for i, text in enumerate(texts):
        if not text:
            raise UsageError(f"prompt {i} is empty")
        ids = [int(t) for t in tokenizer.encode(text, add_special_tokens=True).ids]
        if not ids:
            raise ParityError(f"{tokenizer_json}: prompt {i} ({text[:30]!r}) encodes to no tokens")
        encoded.append(ids[:max_tokens])
    return encoded
