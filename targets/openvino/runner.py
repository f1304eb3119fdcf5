"""An OpenVINO artifact on its runtime: prefill, greedy decoding through the stateful cache, its own tokenizer."""

from __future__ import annotations

import contextlib
import json
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sovpack._protocols import PromptRun, RunnerTraits, run_each
from sovpack.errors import ParityError, SourceError, UsageError
from sovpack.targets.batching import run_left_padded
from sovpack.targets.openvino.runtime import (
    DETOKENIZER_XML,
    MODEL_XML,
    PARITY_CONFIG,
    TOKENIZER_XML,
    require_openvino,
    require_tokenizers,
)

if TYPE_CHECKING:
    from sovpack.artifact import ArtifactMetadata

_REPORTED_PROPERTIES = (
    "INFERENCE_PRECISION_HINT",
    "KV_CACHE_PRECISION",
    "DYNAMIC_QUANTIZATION_GROUP_SIZE",
    "EXECUTION_MODE_HINT",
    "PERFORMANCE_HINT",
    "NUM_STREAMS",
    "INFERENCE_NUM_THREADS",
)
_STATE_INPUTS = frozenset({"input_ids", "attention_mask", "position_ids", "beam_idx"})


def _type_name(value: Any) -> str:
    """An OpenVINO property value as text: element types as their short names (f32, u8), the rest str()."""
    name = getattr(value, "get_type_name", None)
    if callable(name):
        return str(name())
    return str(getattr(value, "name", value))


def _compile(core: Any, path: Path, device: str, config: Mapping[str, str] | None = None) -> Any:
    """Read an IR (SourceError if OpenVINO cannot) and compile it on ``device`` (ParityError if that fails)."""
    # OpenVINO reports every failure as a RuntimeError carrying the plugin's message.
    try:
        model = core.read_model(str(path))
    except RuntimeError as e:
        raise SourceError(f"{path}: OpenVINO could not read it: {e}") from e
    try:
        return core.compile_model(model, device, dict(config or {}))
    except RuntimeError as e:
        raise ParityError(f"{path}: OpenVINO could not compile it on {device}: {e}") from e


@dataclass(frozen=True, kw_only=True, slots=True)
class _Session:
    """The runtime objects of an open runner; dropping them releases the compiled models and their memory."""

    core: Any
    compiled: Any
    request: Any
    tokenizer: Any | None
    detokenizer: Any | None


class OpenvinoRunner:
    """An artifact on OpenVINO (CPU by default): prefill, greedy decode through the stateful cache, tokenizer.

    ``config`` replaces :data:`PARITY_CONFIG` (pass ``{}`` for the plugin's defaults). Greedy decoding resets
    the cache state before each prompt and feeds ``beam_idx = 0`` (one sequence). ``metadata`` is the
    artifact's ``sovpack-artifact.json`` (None when a directory is opened directly).
    """

    name = "openvino"

    def __init__(
        self,
        artifact_dir: Path,
        metadata: ArtifactMetadata | None = None,
        *,
        device: str = "CPU",
        config: Mapping[str, str] | None = None,
    ) -> None:
        ov = require_openvino()
        self.dir = Path(artifact_dir)
        self.metadata = metadata
        self.traits: RunnerTraits = metadata.traits if metadata is not None else RunnerTraits()
        self.device = device
        self.config = dict(PARITY_CONFIG if config is None else config)
        xml = self.dir / MODEL_XML
        if not xml.is_file():
            raise SourceError(f"{xml}: missing (not an OpenVINO artifact directory?)")
        has_tokenizer = (self.dir / TOKENIZER_XML).is_file()
        if has_tokenizer:
            require_tokenizers()
        core = ov.Core()
        compiled = _compile(core, xml, device, self.config)
        names = {name for port in compiled.inputs for name in port.names}
        missing = _STATE_INPUTS - names
        if missing:
            raise SourceError(f"{xml}: inputs {sorted(missing)} are missing; not a sovpack/optimum stateful model")
        detok = self.dir / DETOKENIZER_XML
        self._session: _Session | None = _Session(
            core=core,
            compiled=compiled,
            request=compiled.create_infer_request(),
            tokenizer=_compile(core, self.dir / TOKENIZER_XML, "CPU") if has_tokenizer else None,
            detokenizer=_compile(core, detok, "CPU") if detok.is_file() else None,
        )
        self.vocab_size = int(compiled.output("logits").get_partial_shape()[2].get_length())

    @property
    def session(self) -> _Session:
        if self._session is None:
            raise UsageError(f"the OpenVINO runner on {self.dir} is closed")
        return self._session

    @property
    def request(self) -> Any:
        """The decoder's infer request (stateful: reset it before a new sequence)."""
        return self.session.request

    def close(self) -> None:
        """Release the compiled models, the infer request and the core; later calls do nothing."""
        self._session = None

    # -- the model -------------------------------------------------------------------------------------
    def _step(self, ids: Sequence[int], past: int) -> np.ndarray:
        steps = len(ids)
        return self._batch_step(np.asarray([ids], dtype=np.int64), np.ones((1, past + steps), dtype=np.int64),
                                np.arange(past, past + steps, dtype=np.int64)[None, :])[0]

    def _regimes_differ(self, lengths: Sequence[int], max_new_tokens: int) -> bool:
        """Whether some prompt would pass LongRoPE's switch where the batch's longest prompt is past it."""
        scaling = self.metadata.spec.rope_scaling if self.metadata is not None else None
        if scaling is None or scaling.kind != "longrope":
            return False
        switch = scaling.original_max_position_embeddings or 0
        return not (max(lengths) + max_new_tokens <= switch or min(lengths) > switch)

    def _batch_step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Logits [B, T, V] of one step of a batch whose cache rows stay in place (beam_idx = 0..B-1)."""
        try:
            result = self.request.infer({
                "input_ids": ids,
                "attention_mask": mask,
                "position_ids": positions,
                "beam_idx": np.arange(ids.shape[0], dtype=np.int32),
            })
        except RuntimeError as e:  # the plugin's failure, with its message
            raise ParityError(f"{self.dir / MODEL_XML}: OpenVINO inference failed: {e}") from e
        return np.asarray(result["logits"], dtype=np.float32)  # infer() hands back copies (share_outputs=False)

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        tokens = [int(t) for t in ids]
        if not tokens:
            raise UsageError("the OpenVINO runner needs at least one token id")
        bad = [t for t in tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise UsageError(f"token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        return tokens

    def prefill_logits(self, ids: Sequence[int]) -> np.ndarray:
        tokens = self._check_ids(ids)
        self.request.reset_state()
        return self._step(tokens, 0)

    def greedy(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        tokens = self._check_ids(ids)
        stops = {int(s) for s in stop_ids}
        self.request.reset_state()
        logits = self._step(tokens, 0)
        past = len(tokens)
        generated: list[int] = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(logits[-1]))
            generated.append(token)
            if token in stops:
                break
            logits = self._step([token], past)
            past += 1
        return generated

    def run_prompts(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int] = ()
    ) -> list[PromptRun]:
        """All prompts in one left-padded batch: one prefill, then greedy steps in lockstep through the state.

        A LongRoPE graph picks its factors by the largest position in the whole batch (as transformers does),
        so prompts whose runs would sit in different regimes alone are run one by one.
        """
        if prompts and self._regimes_differ([len(ids) for ids in prompts], max_new_tokens):
            return run_each(self, prompts, max_new_tokens, stop_ids)
        checked = [self._check_ids(ids) for ids in prompts]
        self.request.reset_state()
        return run_left_padded(checked, self._batch_step, max_new_tokens, stop_ids)

    # -- the tokenizer ---------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int] | None:
        tokenizer = self.session.tokenizer
        if tokenizer is None:
            return None
        try:
            result = tokenizer([text])
        except RuntimeError as e:
            raise ParityError(f"{self.dir / TOKENIZER_XML}: the OpenVINO tokenizer failed: {e}") from e
        return [int(t) for t in result["input_ids"][0]]

    def detokenize(self, ids: Sequence[int]) -> str | None:
        detokenizer = self.session.detokenizer
        if detokenizer is None:
            return None
        try:
            result = detokenizer(np.asarray([list(ids)], dtype=np.int64))
        except RuntimeError as e:
            raise ParityError(f"{self.dir / DETOKENIZER_XML}: the OpenVINO detokenizer failed: {e}") from e
        return str(result[0][0])

    def runtime_info(self) -> dict[str, str]:
        ov = require_openvino()
        session = self.session
        info = {
            "runtime": "openvino",
            "openvino": ov.get_version(),
            "device": self.device,
            "python": platform.python_version(),
            "requested_config": json.dumps(self.config, sort_keys=True),
            "artifact_precision": self.metadata.precision if self.metadata is not None else "",
        }
        # Provenance only: a device or plugin that does not report a property (RuntimeError) leaves it out.
        with contextlib.suppress(RuntimeError):
            info["device_name"] = str(session.core.get_property(self.device, "FULL_DEVICE_NAME"))
        for key in _REPORTED_PROPERTIES:
            try:
                info[key.lower()] = _type_name(session.compiled.get_property(key))
            except RuntimeError:
                continue
        try:
            import openvino_tokenizers
        except ImportError:
            return info
        info["openvino_tokenizers"] = openvino_tokenizers.__version__
        return info
