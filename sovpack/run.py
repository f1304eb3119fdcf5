"""``sovpack run``: greedy generation (decoders) or embeddings (encoders), from a checkpoint (numpy reference), an
artifact directory or a bundle (its runtime)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sovpack._protocols import EmbeddingRunner, Runner
from sovpack.artifact import ArtifactMetadata, is_artifact_dir
from sovpack.attest.dsse import VerifyingKey
from sovpack.errors import ParityError, SourceError, UsageError
from sovpack.oci.store import is_bundle_dir
from sovpack.source.model import open_model
from sovpack.source.spec import ModelSpec
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
            _require_kind(path, model.spec, decoder=True)
            reference = ReferenceModel(model)
            stack.callback(reference.close)
            yield OpenedRunner(
                runner=reference, tokenizer=model.checkpoint.tokenizer_json, stop_ids=model.spec.eos_token_ids,
                verified=None,
            )
            return
        directory, metadata = _artifact(stack, path, keys, decoder=True)
        runner = TargetRef.parse(metadata.target).target.open_runner(directory, metadata)
        stack.callback(runner.close)
        tokenizer = directory / "tokenizer.json"
        yield OpenedRunner(
            runner=runner, tokenizer=tokenizer if tokenizer.is_file() else None,
            stop_ids=metadata.spec.eos_token_ids, verified=bool(keys),
        )


def _artifact(stack: contextlib.ExitStack, path: Path, keys: Sequence[VerifyingKey], *, decoder: bool
              ) -> tuple[Path, ArtifactMetadata]:
    """An artifact directory to open and its metadata: with keys a private copy verified against ``model.sig``
    (removed when ``stack`` closes), else the directory as it is; the model kind must be the one asked for."""
    directory = path
    if keys:
        from sovpack.verify.signed_dir import private_verified_copy

        directory = stack.enter_context(private_verified_copy(path, keys))
    metadata = ArtifactMetadata.load(directory)
    _require_kind(path, metadata.spec, decoder=decoder)
    return directory, metadata


def _require_kind(path: Path, spec: ModelSpec, *, decoder: bool) -> None:
    """Refuse generating with an encoder or embedding with a decoder, naming what the model is."""
    if decoder and spec.encoder is not None:
        raise UsageError(f"{path}: an embedding encoder ({spec.family}): embed texts with --text; --prompt and --ids "
                         "generate with decoders")
    if not decoder and spec.encoder is None:
        raise UsageError(f"{path}: a decoder ({spec.family}): generate with --prompt or --ids; --text embeds with "
                         "embedding encoders")


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


# --------------------------------------------------------------------------------------------- embeddings


@dataclass(frozen=True, kw_only=True, slots=True)
class EmbedResult:
    """Embeddings of several texts on one runtime and their pairwise cosine similarities.

    ``tokens``: how many tokens each text was embedded as (after truncation at ``max_input_tokens``), None where
    the runtime does not say. ``pooling`` / ``normalize`` / ``max_seq_length``: the model's pipeline.
    """

    runtime: str
    family: str
    texts: tuple[str, ...]
    tokens: tuple[int | None, ...]
    embeddings: np.ndarray  # [texts, dimension], float32
    cosine: np.ndarray  # [texts, texts], float64
    pooling: str
    normalize: bool
    max_seq_length: int | None
    max_input_tokens: int
    verified: bool | None  # as RunResult.verified

    def to_dict(self, *, vectors: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "runtime": self.runtime,
            "family": self.family,
            "model": "embedding encoder",
            "texts": list(self.texts),
            "tokens": list(self.tokens),
            "shape": list(self.embeddings.shape),
            "pooling": self.pooling,
            "normalize": self.normalize,
            "max_seq_length": self.max_seq_length,
            "max_input_tokens": self.max_input_tokens,
            "cosine": [[round(float(c), 6) for c in row] for row in self.cosine],
            "verified": self.verified,
        }
        if vectors:
            data["embeddings"] = [[float(x) for x in row] for row in self.embeddings]
        return data


def cosine_matrix(embeddings: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarities [n, n] in float64; a zero vector is 0 to everything."""
    e = embeddings.astype(np.float64)
    norms = np.linalg.norm(e, axis=1)
    unit = e / np.where(norms > 0, norms, 1.0)[:, None]
    return np.clip(unit @ unit.T, -1.0, 1.0)


@dataclass(frozen=True, kw_only=True, slots=True)
class OpenedEmbedder:
    """An embedding runner, the spec it runs, a tokenizer for runners without their own, and verification."""

    runner: EmbeddingRunner
    spec: ModelSpec
    tokenizer: SourceTokenizer | None
    verified: bool | None



def _tokenizer(tokenizer_json: Path | None, spec: ModelSpec) -> SourceTokenizer | None:
    if tokenizer_json is None or not tokenizer_json.is_file() or spec.encoder is None:
        return None
    return SourceTokenizer(tokenizer_json, max_length=spec.max_input_tokens())


@contextlib.contextmanager
def opened_embedder(
    path: Path,
    *,
    target: str | None = None,
    keys: Sequence[VerifyingKey] = (),
    policy: Policy | None = None,
    insecure: bool = False,
) -> Iterator[OpenedEmbedder]:
    """Open the embedding encoder ``path`` holds, as :func:`opened_runner` opens a decoder (same verification)."""
    with contextlib.ExitStack() as stack:
        if is_bundle_dir(path):
            from sovpack.verify import open_bundle_embedding_runner

            # A decoder target is refused there by name, after the bundle is read and before anything runs.
            bundled = open_bundle_embedding_runner(path, target, keys, policy=policy, insecure=insecure)
            stack.callback(bundled.close)
            yield OpenedEmbedder(runner=bundled, spec=bundled.metadata.spec, tokenizer=None, verified=bool(keys))
            return
        if target is not None:
            raise UsageError(f"{path}: -t/--target selects a target of a bundle; this is not a bundle")
        if not is_artifact_dir(path):
            from sovpack.encoder_reference import EncoderReference

            model = open_model(path)
            _require_kind(path, model.spec, decoder=False)
            tokenizer = _tokenizer(model.checkpoint.tokenizer_json, model.spec)
            if tokenizer is None:
                raise SourceError(f"{path}: no tokenizer.json to encode the texts with")
            reference = EncoderReference(model)
            stack.callback(reference.close)
            yield OpenedEmbedder(runner=reference, spec=model.spec, tokenizer=tokenizer, verified=None)
            return
        directory, metadata = _artifact(stack, path, keys, decoder=False)
        opened = TargetRef.parse(metadata.target).target.open_embedding_runner(directory, metadata)
        stack.callback(opened.close)
        yield OpenedEmbedder(
            runner=opened, spec=metadata.spec, tokenizer=_tokenizer(directory / "tokenizer.json", metadata.spec),
            verified=bool(keys),
        )


def embed(
    path: str | Path,
    texts: Sequence[str],
    *,
    target: str | None = None,
    keys: Sequence[VerifyingKey] = (),
    policy: Policy | None = None,
    insecure: bool = False,
) -> EmbedResult:
    """Embed ``texts`` as one batch and compare them pairwise.

    NOTE: an artifact embeds through its runtime's own text pipeline (``embed_texts``: its tokenizer, truncation
    and pooling, as a user of that runtime gets them); only a runner without one (the numpy reference) is given
    token ids from tokenizer.json truncated at max_seq_length, as sentence-transformers truncates.
    """
    if not texts:
        raise UsageError("give one or more texts to embed (--text)")
    with opened_embedder(Path(path), target=target, keys=keys, policy=policy, insecure=insecure) as opened:
        runner = opened.runner
        ids: list[list[int] | None] = []
        for text in texts:
            own = runner.tokenize(text)
            ids.append(own if own is not None else
                       opened.tokenizer.encode(text) if opened.tokenizer is not None else None)
        vectors = runner.embed_texts(list(texts))
        if vectors is None:
            known = [x for x in ids if x is not None]
            if len(known) != len(ids):
                raise SourceError(f"{path}: {runner.name} has no text pipeline and there is no tokenizer.json")
            vectors = runner.embed_ids(known).embeddings
        embeddings = np.asarray(vectors, dtype=np.float32)
        expected = (len(texts), opened.spec.hidden_size)
        if embeddings.shape != expected:
            raise ParityError(f"{path}: {runner.name} returned embeddings of shape {list(embeddings.shape)}, "
                              f"expected {list(expected)}")
        encoder = opened.spec.encoder
        if encoder is None:  # refused by name when opened; kept for the type checker
            raise UsageError(f"{path}: not an embedding encoder")
        return EmbedResult(
            runtime=runner.name, family=opened.spec.family, texts=tuple(texts),
            tokens=tuple(None if x is None else len(x) for x in ids), embeddings=embeddings,
            cosine=cosine_matrix(embeddings), pooling=encoder.pooling.mode, normalize=encoder.pooling.normalize,
            max_seq_length=encoder.pooling.max_seq_length, max_input_tokens=opened.spec.max_input_tokens(),
            verified=opened.verified,
        )
