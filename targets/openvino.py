"""The ``openvino`` target: a stateful OpenVINO IR directory that openvino-genai's ``LLMPipeline`` loads.

An artifact directory holds ``openvino_model.xml``/``.bin`` (the decoder, KV cache as internal state),
``openvino_tokenizer.xml``/``openvino_detokenizer.xml`` (+ ``.bin``), the checkpoint's tokenizer and config
files and a ``generation_config.json`` with the stop ids, which is what ``openvino_genai.LLMPipeline(dir,
"CPU")`` needs to tokenize, generate and detokenize. The graph's interface — inputs ``input_ids``,
``attention_mask``, ``position_ids``, ``beam_idx``, output ``logits``, cache variables named
``past_key_values.{i}.keypresent.{i}.key`` / ``...valuepresent.{i}.value`` — is the one optimum-intel exports
(see ``_openvino_graph``).

NOTE: the graph is built directly with OpenVINO's Python graph API (``openvino.opset13``) from the canonical
spec and weights, not converted from the ONNX target's graph. That keeps this target independent of the ONNX
builder (written concurrently), lets the KV cache be ReadValue/Assign state from the start (an ONNX graph has
explicit past/present tensors, which would then need OpenVINO's MakeStateful rewrite plus beam_idx surgery),
and lets weights enter as postponed constants that ``ov.save_model`` materializes one at a time, so the
writer never holds the model in memory (``_openvino_weights``). The tokenizer is converted from tokenizer.json
without transformers (``_openvino_tokenizer``).

Every node of the three IRs has a deterministic name (block and role, or a counter local to the graph):
OpenVINO's default names number nodes from a process-wide counter, which made a second conversion in the same
process write different XML. The same checkpoint therefore gives byte-identical files in any process.

Parity runs on the CPU plugin with ``INFERENCE_PRECISION_HINT=f32``, ``KV_CACHE_PRECISION=f32`` and
``DYNAMIC_QUANTIZATION_GROUP_SIZE=0`` for every precision. On CPUs with AMX or AVX512-BF16 the plugin otherwise
computes in bf16, stores the KV cache as u8 and quantizes activations for int8/int4 weights, all silently;
with these hints the check measures what the artifact's weights do (f16 rounding, int8/int4 quantization)
and nothing else. Both the requested and the effective values are recorded in ``runtime_info``.
"""

from __future__ import annotations

import contextlib
import json
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sovpack.errors import ConversionError, MissingDependencyError, SourceError, UsageError
from sovpack.model import SourceModel
from sovpack.targets.base import TARGETS, Progress, WrittenArtifact

MODEL_XML = "openvino_model.xml"
MODEL_BIN = "openvino_model.bin"
TOKENIZER_XML = "openvino_tokenizer.xml"
DETOKENIZER_XML = "openvino_detokenizer.xml"
GENERATION_CONFIG = "generation_config.json"
PRECISIONS = ("fp32", "fp16", "int8", "int8_sym", "int4", "int4_sym")

# Compile properties for parity (see the module docstring). Values are strings so they read the same in the
# report as on a command line (benchmark_app -hint ..., LLMPipeline(..., **PARITY_CONFIG)).
PARITY_CONFIG: dict[str, str] = {
    "INFERENCE_PRECISION_HINT": "f32",
    "KV_CACHE_PRECISION": "f32",
    "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0",
}
_REPORTED_PROPERTIES = (
    "INFERENCE_PRECISION_HINT",
    "KV_CACHE_PRECISION",
    "DYNAMIC_QUANTIZATION_GROUP_SIZE",
    "EXECUTION_MODE_HINT",
    "PERFORMANCE_HINT",
    "NUM_STREAMS",
    "INFERENCE_NUM_THREADS",
)


def _require_openvino() -> Any:
    try:
        import openvino
    except ImportError as e:
        raise MissingDependencyError("openvino", "openvino") from e
    return openvino


def _require_tokenizers() -> Any:
    try:
        import openvino_tokenizers  # registers the tokenizer ops with every ov.Core created afterwards
    except ImportError as e:
        raise MissingDependencyError("openvino_tokenizers", "openvino") from e
    return openvino_tokenizers


def _type_name(value: Any) -> str:
    """An OpenVINO property value as text: element types as their short names (f32, u8), the rest str()."""
    name = getattr(value, "get_type_name", None)
    if callable(name):
        return str(name())
    return str(getattr(value, "name", value))


# ------------------------------------------------------------------------------------------------ writing


class OpenvinoTarget:
    """OpenVINO IR for openvino-genai, built with the OpenVINO graph API."""

    name = "openvino"
    precisions = PRECISIONS
    default_precision = "fp16"

    def write(self, model: SourceModel, precision: str, out_dir: Path, progress: Progress) -> WrittenArtifact:
        ov = _require_openvino()
        openvino_tokenizers = _require_tokenizers()
        from sovpack import __version__
        from sovpack.targets._openvino_graph import INPUT_NAMES, OUTPUT_NAME, build_model, state_names
        from sovpack.targets._openvino_weights import SCHEMES, WeightFactory, mark_fp16_decompression

        if precision not in SCHEMES:
            raise UsageError(f"target 'openvino' has no precision {precision!r}; known: {', '.join(PRECISIONS)}")
        scheme = SCHEMES[precision]
        out = Path(out_dir)
        label = f"openvino:{precision}: weights"
        total = len(model.tensor_map)
        done = {"n": 0}

        def on_tensor(_name: str) -> None:
            done["n"] += 1
            progress(label, min(done["n"], total), total)

        weights = WeightFactory(model, scheme, on_tensor)
        progress(label, 0, total)
        graph = build_model(model.spec, weights)
        for key, value in (("sovpack_version", __version__), ("precision", precision),
                           ("family", model.spec.family), ("architecture", model.spec.architecture)):
            graph.set_rt_info(str(value), ["sovpack", key])
        try:
            ov.save_model(graph, out / MODEL_XML, compress_to_fp16=False)
        except ConversionError:
            raise
        except Exception as e:  # a failing weight maker surfaces as whatever the binding wraps it in
            cause = e.__cause__ or e.__context__
            if isinstance(cause, ConversionError):
                raise cause from e
            raise ConversionError(f"{out / MODEL_XML}: writing the OpenVINO IR failed: {e}") from e
        del graph
        fp16 = scheme.kind == "float" and scheme.float_dtype == np.float16
        marked = mark_fp16_decompression(out / MODEL_XML) if fp16 else 0
        progress(label, total, total)

        files = [MODEL_XML, MODEL_BIN]
        tokenizer_info = self._write_tokenizer(model, out, files)
        files.extend(self._write_support_files(model, out))

        stats = weights.stats
        metadata: dict[str, Any] = {
            "openvino_version": ov.get_version(),
            "openvino_tokenizers_version": openvino_tokenizers.__version__,
            "precision": precision,
            "weights": {
                "scheme": precision,
                "tensors": stats.tensors,
                "float_tensors": stats.float_tensors,
                "float_dtype": "f16" if precision == "fp16" else "f32",
                "int8_tensors": stats.int8_layers,
                "int4_tensors": stats.int4_layers,
                "int4_group_sizes": sorted(stats.group_sizes),
                "symmetric": scheme.symmetric if scheme.kind == "int" else None,
                "fp16_decompression_marked": marked,
            },
            "inputs": list(INPUT_NAMES),
            "outputs": [OUTPUT_NAME],
            "kv_cache": {
                "kind": "stateful (ReadValue/Assign), reordered by beam_idx",
                "layout": "[batch, kv_heads, seq, head_dim]",
                "dtype": "f32",
                "variables": [name for i in range(model.spec.num_layers) for name in state_names(i)],
            },
            "tokenizer": tokenizer_info,
            "parity_compile_config": dict(PARITY_CONFIG),
        }
        return WrittenArtifact(files=tuple(files), metadata=metadata)

    @staticmethod
    def _write_tokenizer(model: SourceModel, out: Path, files: list[str]) -> dict[str, Any]:
        ov = _require_openvino()
        from sovpack.targets._openvino_tokenizer import convert_tokenizer

        checkpoint = model.checkpoint
        if checkpoint.tokenizer_json is None:
            return {"converted": False, "reason": "the checkpoint has no tokenizer.json"}
        spec = model.spec
        tokenizer, detokenizer = convert_tokenizer(
            checkpoint.tokenizer_json,
            checkpoint.tokenizer_config,
            chat_template=checkpoint.chat_template,
            bos_token_id=spec.bos_token_id,
            eos_token_id=spec.eos_token_ids[0] if spec.eos_token_ids else None,
            pad_token_id=spec.pad_token_id,
        )
        ov.save_model(tokenizer, out / TOKENIZER_XML, compress_to_fp16=False)
        ov.save_model(detokenizer, out / DETOKENIZER_XML, compress_to_fp16=False)
        for xml in (TOKENIZER_XML, DETOKENIZER_XML):
            files.append(xml)
            if (out / xml).with_suffix(".bin").is_file():
                files.append(str(Path(xml).with_suffix(".bin")))
        return {
            "converted": True,
            "route": "tokenizer.json -> openvino_tokenizers pipeline steps (no transformers)",
            "chat_template": checkpoint.chat_template is not None,
        }

    @staticmethod
    def _write_support_files(model: SourceModel, out: Path) -> list[str]:
        from sovpack.convert import TOKENIZER_COPY, copy_support_files

        copied = copy_support_files(model, out, [n for n in TOKENIZER_COPY if n != GENERATION_CONFIG])
        spec = model.spec
        generation = dict(model.checkpoint.generation_config or {})
        if generation.get("eos_token_id") is None and spec.eos_token_ids:
            ids = list(spec.eos_token_ids)
            generation["eos_token_id"] = ids[0] if len(ids) == 1 else ids
        if generation.get("bos_token_id") is None and spec.bos_token_id is not None:
            generation["bos_token_id"] = spec.bos_token_id
        if generation.get("pad_token_id") is None and spec.pad_token_id is not None:
            generation["pad_token_id"] = spec.pad_token_id
        text = json.dumps(generation, indent=2, sort_keys=True) + "\n"
        (out / GENERATION_CONFIG).write_text(text, encoding="utf-8")
        return [*copied, GENERATION_CONFIG]

    def open_runner(self, artifact_dir: Path, metadata: dict[str, Any]) -> OpenvinoRunner:
        return OpenvinoRunner(Path(artifact_dir), metadata)


# ------------------------------------------------------------------------------------------------ running


class OpenvinoRunner:
    """An artifact on OpenVINO (CPU by default): prefill, greedy decode through the stateful cache, tokenizer.

    ``config`` replaces :data:`PARITY_CONFIG` (pass ``{}`` for the plugin's defaults). Greedy decoding resets
    the cache state before each prompt and feeds ``beam_idx = 0`` (one sequence).
    """

    name = "openvino"

    def __init__(
        self,
        artifact_dir: Path,
        metadata: Mapping[str, Any] | None = None,
        *,
        device: str = "CPU",
        config: Mapping[str, str] | None = None,
    ) -> None:
        ov = _require_openvino()
        self.dir = Path(artifact_dir)
        self.metadata = dict(metadata or {})
        self.device = device
        self.config = dict(PARITY_CONFIG if config is None else config)
        xml = self.dir / MODEL_XML
        if not xml.is_file():
            raise SourceError(f"{xml}: missing (not an OpenVINO artifact directory?)")
        has_tokenizer = (self.dir / TOKENIZER_XML).is_file()
        if has_tokenizer:
            _require_tokenizers()
        self.core = ov.Core()
        try:
            self.compiled = self.core.compile_model(str(xml), device, self.config)
        except Exception as e:  # OpenVINO raises RuntimeError subclasses with the plugin's message
            raise SourceError(f"{xml}: OpenVINO could not compile it on {device}: {e}") from e
        self.request = self.compiled.create_infer_request()
        names = {name for port in self.compiled.inputs for name in port.names}
        missing = {"input_ids", "attention_mask", "position_ids", "beam_idx"} - names
        if missing:
            raise SourceError(f"{xml}: inputs {sorted(missing)} are missing; not a sovpack/optimum stateful model")
        self._tokenizer = self.core.compile_model(str(self.dir / TOKENIZER_XML), "CPU") if has_tokenizer else None
        detok = self.dir / DETOKENIZER_XML
        self._detokenizer = self.core.compile_model(str(detok), "CPU") if detok.is_file() else None
        self.vocab_size = int(self.compiled.output("logits").get_partial_shape()[2].get_length())

    # -- the model -------------------------------------------------------------------------------------
    def _step(self, ids: Sequence[int], past: int) -> np.ndarray:
        steps = len(ids)
        result = self.request.infer({
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, past + steps), dtype=np.int64),
            "position_ids": np.arange(past, past + steps, dtype=np.int64)[None, :],
            "beam_idx": np.zeros(1, dtype=np.int32),
        })
        return np.array(result["logits"][0], dtype=np.float32, copy=True)

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

    # -- the tokenizer ---------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int] | None:
        if self._tokenizer is None:
            return None
        result = self._tokenizer([text])
        return [int(t) for t in result["input_ids"][0]]

    def detokenize(self, ids: Sequence[int]) -> str | None:
        if self._detokenizer is None:
            return None
        result = self._detokenizer(np.asarray([list(ids)], dtype=np.int64))
        return str(result[0][0])

    def runtime_info(self) -> dict[str, str]:
        ov = _require_openvino()
        info = {
            "runtime": "openvino",
            "openvino": ov.get_version(),
            "device": self.device,
            "python": platform.python_version(),
            "requested_config": json.dumps(self.config, sort_keys=True),
            "artifact_precision": str(self.metadata.get("precision", "")),
        }
        with contextlib.suppress(Exception):  # provenance only
            info["device_name"] = str(self.core.get_property(self.device, "FULL_DEVICE_NAME"))
        for key in _REPORTED_PROPERTIES:
            try:
                info[key.lower()] = _type_name(self.compiled.get_property(key))
            except Exception:  # not every device reports every property
                continue
        try:
            import openvino_tokenizers

            info["openvino_tokenizers"] = openvino_tokenizers.__version__
        except ImportError:
            pass
        return info


TARGETS.add("openvino", OpenvinoTarget())
