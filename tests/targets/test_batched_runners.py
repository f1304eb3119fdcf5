"""Each runtime's batched parity run answers what the same runtime answers prompt by prompt.

Parity feeds all prompts to a runner at once (``Runner.run_prompts``: one padded prefill, greedy steps in
lockstep). A batch must not change what is measured: every prompt's prefill logits match its own single
sequence run within float32 rounding, and the greedy continuations are the same tokens. The fixtures cover
what a batch could get wrong: sliding windows shorter than the prompts (gemma2, mistral), LongRoPE switching
factors inside the prompt range (phi3.5; OpenVINO's graph decides it for the whole batch, so its runner runs
such prompts one by one), NoPE windowed layers (smollm3), attention sinks and routed experts (gpt-oss).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sovpack._protocols import run_each
from sovpack.artifact import ArtifactMetadata
from sovpack.convert import convert
from sovpack.parity.prompts import encode_prompts
from sovpack.reference import ReferenceModel
from sovpack.source.model import open_model
from sovpack.targets import TargetRef

VARIANTS = ("llama3", "gemma2", "mistral", "phi3.5", "smollm3", "gptoss")
TARGETS = ("onnx:fp32", "gguf:f32", "openvino:fp32")
NEW_TOKENS = 6
# llama.cpp has no LongRoPE architecture to write phi3.5 into.
CASES = [(v, t) for v in VARIANTS for t in TARGETS if (v, t) != ("phi3.5", "gguf:f32")]


@pytest.mark.parametrize(("variant", "target"), CASES)
def test_batched_run_matches_single_sequences(
    checkpoints: dict[str, Path], tmp_path: Path, variant: str, target: str
) -> None:
    ckpt = checkpoints[variant]
    result = convert(ckpt, target, tmp_path / "artifact", parity=False)
    metadata = ArtifactMetadata.load(result.out_dir)
    runner = TargetRef.parse(target).target.open_runner(result.out_dir, metadata)
    try:
        prompts = encode_prompts(ckpt / "tokenizer.json")
        batched = runner.run_prompts(prompts, NEW_TOKENS)
        single = run_each(runner, prompts, NEW_TOKENS)
        assert len(batched) == len(single) == len(prompts)
        for ids, together, alone in zip(prompts, batched, single, strict=True):
            assert together.logits.shape == alone.logits.shape == (len(ids), alone.logits.shape[1])
            scale = float(np.abs(alone.logits).max())
            np.testing.assert_allclose(together.logits, alone.logits, rtol=0, atol=2e-4 * scale)
            assert list(together.tokens) == list(alone.tokens) and len(alone.tokens) == NEW_TOKENS
    finally:
        runner.close()


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_batched_run_matches_single_sequences(checkpoints: dict[str, Path], variant: str) -> None:
    """The numpy reference skips the padding slots of a batch in its matrix products (and in a decode step,
    the prompts that have stopped): every prompt still gets its own single-sequence answers."""
    ckpt = checkpoints[variant]
    reference = ReferenceModel(open_model(ckpt))
    prompts = encode_prompts(ckpt / "tokenizer.json")
    assert len({len(ids) for ids in prompts}) > 1  # uneven: the batch has padding
    batched = reference.run_prompts(prompts, NEW_TOKENS)
    single = run_each(reference, prompts, NEW_TOKENS)
    for together, alone in zip(batched, single, strict=True):
        scale = float(np.abs(alone.logits).max())
        np.testing.assert_allclose(together.logits, alone.logits, rtol=0, atol=1e-5 * scale)
        assert list(together.tokens) == list(alone.tokens)
