"""``sovpack run``: greedy generation from a checkpoint (numpy reference) or an artifact (its runtime)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
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
from sovpack.verify.policy import Policy


@dataclass(frozen=True, kw_only=True, slots=True)
class RunResult:
    runtime: str
    prompt_ids: list[int]
    generated_ids: list[int]
    text: str | None
    logits: np.ndarray
    verified: bool | None  # None: a checkpoint (nothing to verify); False: an artifact run without a key

    def to_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "prompt_ids": self.prompt_ids,
            "generated_ids": self.generated_ids,
            "text": self.text,
            "verified": self.verified,
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class OpenedRunner:
    """A runner, the tokenizer.json to use with it, its stop ids, and whether its files were verified."""

    runner: Runner
    tokenizer: Path | None
    stop_ids: tuple[int, ...]
    verified: bool | None


@contextlib.contextmanager
def opened_runner(
    path: Path,
    *,
    target: str | None = None,
    keys: Sequence[VerifyingKey] = (),
    policy: Policy | None = None,
    insecure: bool = False,
) -> Iterator[OpenedRunner]:
    """Open what ``path`` holds on its runtime, verifying first when keys are given; closed on exit.

    - a bundle: verified with ``keys`` (under ``policy``) and ``target`` extracted to a private directory;
      without keys only with ``insecure=True``;
    - an artifact directory: with keys its ``model.sig`` is verified and only a private, hashed copy of the
      files it signs is loaded; without keys it runs as it is (``verified`` False: callers say so);
    - a checkpoint: the numpy reference.
    """
    with contextlib.ExitStack() as stack:
        if is_bundle_dir(path):
            from sovpack.verify import open_bundle_runner

            runner, tokenizer, stop = open_bundle_runner(path, target, keys, policy=policy, insecure=insecure)
            stack.callback(runner.close)
            yield OpenedRunner(runner=runner, tokenizer=tokenizer, stop_ids=stop, verified=bool(keys))
            return
        if target is not None:
            raise UsageError(f"{path}: -t/--target selects a target of a bundle; this is not a bundle")
        if not is_artifact_dir(path):
            from sovpack.reference import ReferenceModel

            model = open_model(path)
            reference = ReferenceModel(model)
            stack.callback(reference.close)
            yield OpenedRunner(
                runner=reference, tokenizer=model.checkpoint.tokenizer_json, stop_ids=model.spec.eos_token_ids,
                verified=None,
            )
            return
        directory = path
        if keys:
            from sovpack.verify.signed_dir import private_verified_copy

            directory = stack.enter_context(private_verified_copy(path, keys))
        metadata = ArtifactMetadata.load(directory)
        if metadata.spec.encoder is not None:
            raise UsageError(f"{path}: an embedding-encoder artifact ({metadata.spec.family}); sovpack run generates "
                             "text with decoders only")
        runner = TargetRef.parse(metadata.target).target.open_runner(directory, metadata)
        stack.callback(runner.close)
        tokenizer = directory / "tokenizer.json"
        yield OpenedRunner(
            runner=runner, tokenizer=tokenizer if tokenizer.is_file() else None,
            stop_ids=metadata.spec.eos_token_ids, verified=bool(keys),
        )


def run(
    path: str | Path,
    *,
    prompt: str | None = None,
    ids: Sequence[int] | None = None,
    max_new_tokens: int = 16,
    target: str | None = None,
    keys: Sequence[VerifyingKey] = (),
    policy: Policy | None = None,
    insecure: bool = False,
) -> RunResult:
    """Prefill logits and a greedy continuation; text in, text out when the model has a tokenizer."""
    if (prompt is None) == (ids is None):
        raise UsageError("give exactly one of a prompt text or token ids")
    with opened_runner(Path(path), target=target, keys=keys, policy=policy, insecure=insecure) as opened:
        tokenizer = SourceTokenizer(opened.tokenizer) if opened.tokenizer is not None else None
        if prompt is not None:
            if tokenizer is None:
                raise SourceError(f"{path}: no tokenizer.json to encode a text prompt; pass --ids instead")
            prompt_ids = tokenizer.encode(prompt)
        else:
            prompt_ids = [int(i) for i in ids or []]
        if not prompt_ids:
            raise UsageError("the prompt encodes to no tokens")
        logits = opened.runner.prefill_logits(prompt_ids)
        generated = opened.runner.greedy(prompt_ids, max_new_tokens, opened.stop_ids)
        text = tokenizer.decode(generated) if tokenizer is not None else None
        return RunResult(
            runtime=opened.runner.name, prompt_ids=prompt_ids, generated_ids=generated, text=text, logits=logits,
            verified=opened.verified,
        )
