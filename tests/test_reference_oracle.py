"""The numpy reference is itself checked: Hugging Face transformers (PyTorch CPU, a test-only extra) is the
independent oracle. Every family must match to 1e-4 in logits and produce identical greedy tokens."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest

from fixtures.generate import make_checkpoint
from sovpack.reference import ReferenceModel
from sovpack.source.model import open_model
from sovpack.source.tokenizer import SourceTokenizer

torch = pytest.importorskip("torch", reason="the oracle extra (torch + transformers) is required: make test")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.oracle

PROMPTS = [
    "The quick brown fox jumps over the lazy dog, and then it keeps running far away.",
    "Le château de Versailles est situé près de Paris. 北京是中国的首都。",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 12345",
]
NEW_TOKENS = 8


def hf_logits_and_greedy(path: Path, ids: list[int]) -> tuple[np.ndarray, list[int]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # transformers >= 5.2x renamed past_key_values to cache; 4.x only knows the old name.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        logits = out.logits[0].numpy()
        past = getattr(out, "cache", None) or out.past_key_values
        token = int(out.logits[0, -1].argmax())
        generated = [token]
        for _ in range(NEW_TOKENS - 1):
            out = model(torch.tensor([[token]]), use_cache=True, **{cache_arg: past})
            past = getattr(out, "cache", None) or out.past_key_values
            token = int(out.logits[0, -1].argmax())
            generated.append(token)
    return logits, generated


def assert_matches_oracle(path: Path) -> None:
    tokenizer = SourceTokenizer(path / "tokenizer.json")
    reference = ReferenceModel(open_model(path))
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)[:40]
        expected_logits, expected_tokens = hf_logits_and_greedy(path, ids)
        logits = reference.prefill_logits(ids)
        error = float(np.abs(logits - expected_logits).max())
        assert error <= 1e-4, f"{path.name}: max |logits difference| {error:.3g} > 1e-4 on {prompt[:20]!r}"
        assert reference.greedy(ids, NEW_TOKENS) == expected_tokens, path.name
        assert float(np.abs(expected_logits).max()) > 1.0  # the comparison is not between near-zero logits


@pytest.mark.parametrize(
    "variant", ["llama3", "llama2", "mistral", "qwen2", "qwen3", "phi3", "gemma"]
)
def test_reference_matches_transformers(checkpoints: dict[str, Path], variant: str) -> None:
    assert_matches_oracle(checkpoints[variant])


@pytest.mark.parametrize(
    ("variant", "overrides"),
    [
        ("llama3", {"config_dialect": "v5"}),  # rope_parameters instead of rope_theta + rope_scaling
        ("qwen2", {"config_dialect": "v4"}),
        ("mistral", {"sliding_window": 8}),  # prompts are longer than the window
        ("gemma", {"dtype": "bfloat16"}),
    ],
)
def test_reference_matches_transformers_variants(tmp_path: Path, variant: str, overrides: dict) -> None:
    assert_matches_oracle(make_checkpoint(variant, tmp_path / variant, **overrides))
