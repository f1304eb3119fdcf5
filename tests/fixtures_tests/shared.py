"""Helpers the generator's test modules share: the repository root, multilingual samples, a checkpoint's tensors."""

# Multilingual samples deliberately contain full-width CJK punctuation.
# ruff: noqa: RUF001

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[2]

MULTILINGUAL = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Le café est très chaud, n'est-ce pas ?",
    "Größe und Übersicht: straße",
    "¿Dónde está la biblioteca?",
    "Привет, мир! Как дела?",
    "你好，世界！我们正在测试。",
    "こんにちは、世界！東京の駅。",
    "مرحبا بالعالم",
    "def f(x):\n    return x + 1\n\n\tprint(12345, 3.14159)",
    '{"a": [1, 2, 3], "b": null}',
    "spaces   inside  and trailing   ",
    "emoji 🚀 and a clef 𝄞 and CJK ext 𠀀",
]


def generated_tensors(d: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
