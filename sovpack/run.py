"""``sovpack run``: greedy generation from a checkpoint (numpy reference) or an artifact (its runtime)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sovpack._protocols import Runner
from sovpack.artifact import ArtifactMetadata, is_artifact_dir
from sovpack.attest.dsse import VerifyingKey
from sovpack.errors import SourceError, UsageError
from sovpack.oci.store import is_bundle_dir
from sovpack.source.model import open_model
from sovpack.source.tokenizer import SourceTokenizer
from sovpack.targets.base import TargetRef


@dataclass(frozen=True, kw_only=True, slots=True)
class RunResult:
    runtime: str
    prompt_ids: list[int]
    generated_ids: list[int]
    text: str | None
    logits: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "prompt_ids": self.prompt_ids,
            "generated_ids": self.generated_ids,
            "text": self.text,
        }


def open_runner(
    path: Path, *, target: str | None = None, keys: Sequence[VerifyingKey] = ()
) -> tuple[Runner, Path | None, tuple[int, ...]]:
    """A runner for a path, the tokenizer.json to use with it, and its stop ids; the caller closes the runner.

    A bundle (OCI layout) is verified with ``keys`` and ``target`` is extracted to a temporary directory.
    """
    if is_bundle_dir(path):
        from sovpack.verify import open_bundle_runner

        return open_bundle_runner(path, target, keys)
    if target is not None:
        raise UsageError(f"{path}: -t/--target selects a target of a bundle; this is not a bundle")
    if not is_artifact_dir(path):
        from sovpack.reference import ReferenceModel

        model = open_model(path)
        return ReferenceModel(model), model.checkpoint.tokenizer_json, model.spec.eos_token_ids
    metadata = ArtifactMetadata.load(path)
    runner = TargetRef.parse(metadata.target).target.open_runner(path, metadata)
    tokenizer = path / "tokenizer.json"
    return runner, tokenizer if tokenizer.is_file() else None, metadata.spec.eos_token_ids


def run(
    path: str | Path,
    *,
    prompt: str | None = None,
    ids: Sequence[int] | None = None,
    max_new_tokens: int = 16,
    target: str | None = None,
    keys: Sequence[VerifyingKey] = (),
) -> RunResult:
    """Prefill logits and a greedy continuation; text in, text out when the model has a tokenizer."""
    if (prompt is None) == (ids is None):
        raise UsageError("give exactly one of a prompt text or token ids")
    runner, tokenizer_path, stop_ids = open_runner(Path(path), target=target, keys=keys)
    tokenizer = SourceTokenizer(tokenizer_path) if tokenizer_path is not None else None
    if prompt is not None:
        if tokenizer is None:
            raise SourceError(f"{path}: no tokenizer.json to encode a text prompt; pass --ids instead")
        prompt_ids = tokenizer.encode(prompt)
    else:
        prompt_ids = [int(i) for i in ids or []]
    if not prompt_ids:
        raise UsageError("the prompt encodes to no tokens")
    try:
        logits = runner.prefill_logits(prompt_ids)
        generated = runner.greedy(prompt_ids, max_new_tokens, stop_ids)
    finally:
        runner.close()
    text = tokenizer.decode(generated) if tokenizer is not None else None
    return RunResult(
        runtime=runner.name, prompt_ids=prompt_ids, generated_ids=generated, text=text, logits=logits
    )
