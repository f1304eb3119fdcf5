"""Runners for onnx artifacts: plain onnxruntime (the parity runner) and onnxruntime-genai.

Both decode through the runtime's own KV cache. A failure inside a runtime is a ParityError carrying the
runtime's message; a closed runner refuses further use with a ParityError too.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sovpack._protocols import PromptRun, RunnerTraits, run_each
from sovpack.errors import ParityError
from sovpack.targets.batching import run_left_padded
from sovpack.targets.onnx.deps import require
from sovpack.targets.onnx.graph import MODEL_FILE

RUNNER_THREADS = 2


def open_session(path: Path, threads: int) -> tuple[Any, str]:
    """An onnxruntime CPU InferenceSession on ``path`` and onnxruntime's version; ParityError if it cannot load."""
    ort = require("onnxruntime")
    version: str = ort.__version__
    if not path.is_file():
        raise ParityError(f"{path}: no ONNX model in the artifact directory")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # NOTE: broad catch. onnxruntime's errors (Fail, InvalidGraph, InvalidProtobuf, NotImplemented, ...)
    # are pybind11 classes deriving directly from Exception, with no narrower common base; each is
    # re-raised as a ParityError with its message.
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ParityError(f"{path}: onnxruntime {version} cannot load the model: {e}") from e
    return session, version


class OnnxRunner:
    """The artifact in an onnxruntime InferenceSession (CPU), decoding through the model's own KV cache."""

    name = "onnxruntime"
    traits: RunnerTraits

    def __init__(
        self,
        artifact_dir: Path,
        *,
        model_file: str = MODEL_FILE,
        threads: int = RUNNER_THREADS,
        traits: RunnerTraits | None = None,
    ) -> None:
        self.traits = traits if traits is not None else RunnerTraits()
        self.threads = threads
        self.path = Path(artifact_dir) / model_file
        session, self.ort_version = open_session(self.path, threads)
        self._session: Any | None = session
        self.providers: list[str] = session.get_providers()
        self.past_names: list[tuple[str, str]] = []
        shapes: dict[str, list[Any]] = {}
        for inp in session.get_inputs():
            shapes[inp.name] = list(inp.shape)
        layer = 0
        while f"past_key_values.{layer}.key" in shapes:
            self.past_names.append((f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"))
            layer += 1
        if not self.past_names:
            raise ParityError(f"{self.path}: the model has no past_key_values inputs")
        _, kv_heads, _, head_dim = shapes["past_key_values.0.key"]
        self.kv_heads, self.head_dim = int(kv_heads), int(head_dim)
        self.output_names = [o.name for o in session.get_outputs()]

    @property
    def session(self) -> Any:
        """The InferenceSession; a ParityError once the runner is closed."""
        if self._session is None:
            raise ParityError(f"{self.path}: the onnxruntime runner is closed")
        return self._session

    def close(self) -> None:
        """Release the session (onnxruntime frees its weights and arena with it); closing twice is a no-op."""
        self._session = None

    # -- one forward pass -------------------------------------------------------------------------------
    def empty_past(self, batch: int) -> list[np.ndarray]:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        return [empty for _ in range(2 * len(self.past_names))]

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: Sequence[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits [B, T, V] and the present KV tensors (key, value per layer) for one step."""
        ids = np.asarray(input_ids, dtype=np.int64)
        feeds: dict[str, np.ndarray] = {
            "input_ids": ids,
            "attention_mask": np.asarray(attention_mask, dtype=np.int64),
            "position_ids": np.asarray(position_ids, dtype=np.int64),
        }
        past = list(past) if past is not None else self.empty_past(ids.shape[0])
        for (key_name, value_name), key, value in zip(self.past_names, past[0::2], past[1::2], strict=True):
            feeds[key_name] = key
            feeds[value_name] = value
        session = self.session
        # NOTE: broad catch, as in __init__: onnxruntime's run-time errors share no base narrower than Exception.
        try:
            outputs = session.run(None, feeds)
        except Exception as e:
            raise ParityError(f"{self.path}: onnxruntime {self.ort_version} failed running the model: {e}") from e
        named = dict(zip(self.output_names, outputs, strict=True))
        present = []
        for i in range(len(self.past_names)):
            present += [named[f"present.{i}.key"], named[f"present.{i}.value"]]
        return named["logits"], present

    # -- the Runner protocol ----------------------------------------------------------------------------
    def prefill_logits(self, ids: Sequence[int]) -> np.ndarray:
        tokens = np.asarray([list(ids)], dtype=np.int64)
        steps = tokens.shape[1]
        logits, _ = self.forward(tokens, np.ones_like(tokens), np.arange(steps, dtype=np.int64)[None])
        return np.asarray(logits[0], dtype=np.float32)

    def greedy(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        tokens = np.asarray([list(ids)], dtype=np.int64)
        total = tokens.shape[1]
        logits, past = self.forward(tokens, np.ones_like(tokens), np.arange(total, dtype=np.int64)[None])
        stop = {int(s) for s in stop_ids}
        generated: list[int] = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(logits[0, -1]))
            generated.append(token)
            if token in stop:
                break
            total += 1
            logits, past = self.forward(
                np.asarray([[token]], dtype=np.int64),
                np.ones((1, total), dtype=np.int64),
                np.asarray([[total - 1]], dtype=np.int64),
                past,
            )
        return generated

    def run_prompts(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int] = ()
    ) -> list[PromptRun]:
        """All prompts in one left-padded batch: one prefill, then greedy steps in lockstep through the cache."""
        past: list[np.ndarray] | None = None  # the prefill starts from an empty cache

        def forward(ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
            nonlocal past
            logits, past = self.forward(ids, mask, positions, past)
            return logits

        return run_left_padded(prompts, forward, max_new_tokens, stop_ids)

    def tokenize(self, text: str) -> list[int] | None:
        """Plain onnxruntime carries no tokenizer (the genai runner does)."""
        return None

    def runtime_info(self) -> dict[str, str]:
        return {
            "runtime": self.name,
            "onnxruntime": self.ort_version,
            "providers": ",".join(self.providers),
            "intra_op_num_threads": str(self.threads),
            "model": self.path.name,
            "python": platform.python_version(),
        }


class GenaiRunner:
    """The artifact through onnxruntime-genai: its own session, KV-cache handling, search and tokenizer.

    onnxruntime-genai reports every failure as a RuntimeError (pybind11's translation of C++ exceptions).
    """

    name = "onnxruntime-genai"
    traits: RunnerTraits

    def __init__(self, artifact_dir: Path, *, traits: RunnerTraits | None = None) -> None:
        og = require("onnxruntime_genai", "onnxruntime-genai")
        self._og = og
        self.dir = Path(artifact_dir)
        self.traits = traits if traits is not None else RunnerTraits()
        try:
            self._model: Any | None = og.Model(str(self.dir))
        except RuntimeError as e:
            raise ParityError(f"{self.dir}: onnxruntime-genai cannot load the artifact: {e}") from e
        self._tokenizer: Any | None = None

    @property
    def model(self) -> Any:
        """The onnxruntime_genai.Model; a ParityError once the runner is closed."""
        if self._model is None:
            raise ParityError(f"{self.dir}: the onnxruntime-genai runner is closed")
        return self._model

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            try:
                tokenizer = self._og.Tokenizer(self.model)
            except RuntimeError as e:
                raise ParityError(f"{self.dir}: onnxruntime-genai cannot load the tokenizer: {e}") from e
            # genai encodes without special tokens unless told; a prompt (and the parity corpus) includes BOS.
            # NOTE: a release without this option (no update_options: AttributeError; the option unknown:
            # RuntimeError) keeps its default encoding; the parity harness reports any resulting difference.
            with contextlib.suppress(AttributeError, RuntimeError):
                tokenizer.update_options(add_special_tokens="true")
            self._tokenizer = tokenizer
        return self._tokenizer

    def close(self) -> None:
        """Release the genai model and tokenizer; closing twice is a no-op."""
        self._tokenizer = None
        self._model = None

    def _generator(self, ids: Sequence[int], max_length: int) -> Any:
        """A greedy generator with ``ids`` appended (prefill done)."""
        try:
            params = self._og.GeneratorParams(self.model)
            params.set_search_options(do_sample=False, max_length=max_length, num_beams=1, top_k=1)
            generator = self._og.Generator(self.model, params)
            generator.append_tokens(np.asarray(list(ids), dtype=np.int32))
        except RuntimeError as e:
            raise ParityError(f"{self.dir}: onnxruntime-genai failed running the model: {e}") from e
        return generator

    def prefill_logits(self, ids: Sequence[int]) -> np.ndarray:
        generator = self._generator(ids, len(ids) + 1)
        try:
            logits = np.asarray(generator.get_output("logits"), dtype=np.float32)
        except RuntimeError as e:
            raise ParityError(f"{self.dir}: onnxruntime-genai failed reading the logits: {e}") from e
        return logits.reshape(-1, logits.shape[-1])[-len(ids):]

    def greedy(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        """Greedy search by genai itself; it also stops at the eos ids of genai_config.json."""
        if max_new_tokens <= 0:
            return []
        generator = self._generator(ids, len(ids) + max_new_tokens)
        stop = {int(s) for s in stop_ids}
        generated: list[int] = []
        try:
            while len(generated) < max_new_tokens and not generator.is_done():
                generator.generate_next_token()
                token = int(generator.get_next_tokens()[0])
                generated.append(token)
                if token in stop:
                    break
        except RuntimeError as e:
            raise ParityError(f"{self.dir}: onnxruntime-genai failed generating: {e}") from e
        return generated

    def run_prompts(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int] = ()
    ) -> list[PromptRun]:
        """Prompt by prompt: genai's own search is what this runner checks, one sequence at a time."""
        return run_each(self, prompts, max_new_tokens, stop_ids)

    def tokenize(self, text: str) -> list[int] | None:
        tokenizer = self.tokenizer
        try:
            return [int(t) for t in tokenizer.encode(text)]
        except RuntimeError as e:
            raise ParityError(f"{self.dir}: onnxruntime-genai's tokenizer failed: {e}") from e

    def runtime_info(self) -> dict[str, str]:
        return {
            "runtime": self.name,
            "onnxruntime_genai": str(getattr(self._og, "__version__", "?")),
            "python": platform.python_version(),
        }
