"""The numpy reference's two ways of holding weights give the same answers (its arithmetic against transformers is
tests/test_reference_oracle.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sovpack.reference import ReferenceModel
from sovpack.source.model import open_model

PROMPTS = [[1, 5, 9, 200, 17, 3], [1, 40, 41], [1, 7, 7, 7, 300, 12, 99, 100, 2]]


@pytest.mark.parametrize("variant", ["llama3", "qwen3moe"])
def test_kept_and_reread_weights_give_the_same_greedy_runs(checkpoints: dict[str, Path], variant: str) -> None:
    model = open_model(checkpoints[variant])
    kept = ReferenceModel(model)
    reread = ReferenceModel(model, cache_budget_bytes=0)  # every tensor read again at each pass

    kept_runs = kept.greedy_batch(PROMPTS, 4)
    # Kept: every weight was cast before the first pass (not between its matrix products), routed or not.
    assert set(kept._weights) == set(model.spec.tensor_shapes())
    reread_runs = reread.greedy_batch(PROMPTS, 4)
    assert not reread._weights
    for a, b in zip(kept_runs, reread_runs, strict=True):
        assert a.tokens == b.tokens
        np.testing.assert_array_equal(a.logits, b.logits)

    kept.close()
    assert not kept._weights
    assert [r.tokens for r in kept.greedy_batch(PROMPTS, 4)] == [r.tokens for r in kept_runs]  # cast again
