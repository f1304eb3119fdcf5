"""The ``onnx`` target: a decoder graph for ONNX Runtime and onnxruntime-genai, with its runners.

An artifact directory holds ``model.onnx`` (graph only), ``model.onnx.data`` (every weight, external data),
``genai_config.json`` (so ``onnxruntime_genai.Model(dir)`` loads it) and the source tokenizer files. Its I/O is
the Optimum / onnxruntime-genai decoder convention: ``input_ids``, ``attention_mask`` (past + new),
``position_ids`` and ``past_key_values.{i}.key/value`` in; ``logits`` and ``present.{i}.key/value`` out, KV
tensors [batch, kv_heads, seq, head_dim]. The graph itself is built in ``_onnx_graph`` (see its NOTEs for the
graph library, fp16 strategy, int8/int4 path and the minimum-onnxruntime rule).

Heavy packages (onnx, onnxruntime, onnxruntime_genai) are imported inside functions, so importing this module
costs nothing and a missing runtime becomes a MissingDependencyError naming the ``onnx`` extra.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sovpack.errors import ConversionError, MissingDependencyError, ParityError
from sovpack.model import SourceModel
from sovpack.spec import ModelSpec
from sovpack.targets.base import TARGETS, Progress, WrittenArtifact

GENAI_CONFIG = "genai_config.json"
RUNNER_THREADS = 2

# onnxruntime-genai model types (the decoder-only types it knows) per sovpack family.
GENAI_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma": "gemma",
}


def _require(module: str, package: str | None = None) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(package or module, "onnx") from e


# ----------------------------------------------------------------------------------------- genai config


def genai_config(spec: ModelSpec, model_file: str) -> dict[str, Any]:
    """The onnxruntime-genai configuration for a graph with sovpack's decoder I/O, greedy by default."""
    eos = [int(t) for t in spec.eos_token_ids]
    pad = spec.pad_token_id if spec.pad_token_id is not None else (eos[0] if eos else 0)
    bos = spec.bos_token_id if spec.bos_token_id is not None else (eos[0] if eos else pad)
    return {
        "model": {
            "bos_token_id": int(bos),
            "context_length": int(spec.max_position_embeddings),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file,
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": spec.num_heads,
                "num_hidden_layers": spec.num_layers,
                "num_key_value_heads": spec.num_kv_heads,
            },
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or int(pad)),
            "pad_token_id": int(pad),
            "type": GENAI_MODEL_TYPES.get(spec.family, "llama"),
            "vocab_size": spec.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": int(spec.max_position_embeddings),
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # Our graph concatenates past + new into present (it does not write into a preallocated buffer).
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


# ------------------------------------------------------------------------------------------------ target


class OnnxTarget:
    """ONNX Runtime / onnxruntime-genai artifacts at fp32, fp16 (fp16 weights, fp32 compute), int8, int4."""

    name = "onnx"
    precisions = ("fp32", "fp16", "int8", "int4")
    default_precision = "fp32"

    def write(self, model: SourceModel, precision: str, out_dir: Path, progress: Progress) -> WrittenArtifact:
        from sovpack.convert import copy_support_files
        from sovpack.targets._onnx_graph import (
            DATA_FILE,
            MODEL_FILE,
            PLANS,
            QUANT_BLOCK_SIZE,
            DecoderBuilder,
            min_onnxruntime,
        )

        onnx = _require("onnx")
        if precision not in PLANS:
            raise ConversionError(f"onnx: unknown precision {precision!r}; known: {', '.join(self.precisions)}")
        plan = PLANS[precision]
        quantizer_version = _require("onnxruntime").__version__ if plan.bits is not None else None

        built = DecoderBuilder(model, precision, out_dir, progress).build()
        model_path = out_dir / MODEL_FILE
        model_path.write_bytes(built.proto.SerializeToString())
        try:
            onnx.checker.check_model(str(model_path), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise ConversionError(f"{model_path}: the ONNX checker rejects the generated model: {e}") from e
        (out_dir / GENAI_CONFIG).write_text(
            json.dumps(genai_config(model.spec, MODEL_FILE), indent=2) + "\n", encoding="utf-8"
        )
        copied = copy_support_files(model, out_dir)

        min_ort, reasons = min_onnxruntime(built.opset, built.ir_version, built.contrib_ops)
        opsets = {(o.domain or "ai.onnx"): int(o.version) for o in built.proto.opset_import}
        metadata: dict[str, Any] = {
            "model_file": MODEL_FILE,
            "external_data_file": DATA_FILE,
            "opset": built.opset,
            "opset_imports": opsets,
            "ir_version": built.ir_version,
            "min_onnxruntime": min_ort,
            "min_onnxruntime_reasons": reasons,
            "onnx_version": onnx.__version__,
            "io": {
                "inputs": ["input_ids", "attention_mask", "position_ids", "past_key_values.%d.key",
                           "past_key_values.%d.value"],
                "outputs": ["logits", "present.%d.key", "present.%d.value"],
                "kv_layout": "[batch, kv_heads, seq, head_dim]",
            },
            "weight_dtype": {"fp32": "float32", "fp16": "float16"}.get(precision, f"int{plan.bits}"),
            "embedding_dtype": plan.embed_dtype.name,
            "compute_dtype": "float32",
            "kv_cache_dtype": "float32",
            "logits_dtype": "float32",
            "genai_model_type": GENAI_MODEL_TYPES.get(model.spec.family, "llama"),
            "data_bytes": built.data_bytes,
            "largest_tensor_bytes": built.largest_tensor_bytes,
            "quantization": None,
        }
        if plan.bits is not None:
            metadata["quantization"] = {
                "op": "com.microsoft.MatMulNBits",
                "quantizer": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
                "onnxruntime_version": quantizer_version,
                "bits": plan.bits,
                "block_size": QUANT_BLOCK_SIZE,
                "symmetric": False,
                "algorithm": "RTN (round to nearest), per-block scale and uint8 zero point",
                "quantized": "every attention and MLP projection (q, k, v, o, gate, up, down)",
                "not_quantized": f"embedding table and lm_head ({plan.embed_dtype.name}), norms and biases "
                "(float32)",
            }
        files = (MODEL_FILE, DATA_FILE, GENAI_CONFIG, *copied)
        return WrittenArtifact(files=files, metadata=metadata)

    def open_runner(self, artifact_dir: Path, metadata: dict[str, Any]) -> OnnxRunner:
        return OnnxRunner(Path(artifact_dir), metadata)


# ------------------------------------------------------------------------------------------------ runners


class OnnxRunner:
    """The artifact in an onnxruntime InferenceSession (CPU), decoding through the model's own KV cache."""

    name = "onnxruntime"

    def __init__(self, artifact_dir: Path, metadata: dict[str, Any] | None = None, *,
                 threads: int = RUNNER_THREADS) -> None:
        ort = _require("onnxruntime")
        self.ort_version = ort.__version__
        self.metadata = dict(metadata or {})
        fmt = self.metadata.get("format_metadata") or {}
        model_file = fmt.get("model_file", "model.onnx")
        self.path = Path(artifact_dir) / model_file
        if not self.path.is_file():
            raise ParityError(f"{self.path}: no ONNX model in the artifact directory")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.providers = self.session.get_providers()
        self.past_names: list[tuple[str, str]] = []
        shapes: dict[str, list[Any]] = {}
        for inp in self.session.get_inputs():
            shapes[inp.name] = list(inp.shape)
        layer = 0
        while f"past_key_values.{layer}.key" in shapes:
            self.past_names.append((f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"))
            layer += 1
        if not self.past_names:
            raise ParityError(f"{self.path}: the model has no past_key_values inputs")
        _, kv_heads, _, head_dim = shapes["past_key_values.0.key"]
        self.kv_heads, self.head_dim = int(kv_heads), int(head_dim)
        self.output_names = [o.name for o in self.session.get_outputs()]

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
        outputs = self.session.run(None, feeds)
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

    def tokenize(self, text: str) -> list[int] | None:
        """Plain onnxruntime carries no tokenizer (the genai runner does)."""
        return None

    def runtime_info(self) -> dict[str, str]:
        return {
            "runtime": self.name,
            "onnxruntime": self.ort_version,
            "providers": ",".join(self.providers),
            "intra_op_num_threads": str(RUNNER_THREADS),
            "model": self.path.name,
            "python": platform.python_version(),
        }


class GenaiRunner:
    """The artifact through onnxruntime-genai: its own session, KV-cache handling, search and tokenizer."""

    name = "onnxruntime-genai"

    def __init__(self, artifact_dir: Path) -> None:
        og = _require("onnxruntime_genai", "onnxruntime-genai")
        self._og = og
        self.dir = Path(artifact_dir)
        self.model = og.Model(str(self.dir))
        self._tokenizer: Any | None = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            tokenizer = self._og.Tokenizer(self.model)
            # genai encodes without special tokens unless told; a prompt (and the parity corpus) includes BOS.
            with contextlib.suppress(AttributeError, RuntimeError):
                tokenizer.update_options(add_special_tokens="true")
            self._tokenizer = tokenizer
        return self._tokenizer

    def _generator(self, max_length: int) -> Any:
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=max_length, num_beams=1, top_k=1)
        return self._og.Generator(self.model, params)

    def prefill_logits(self, ids: Sequence[int]) -> np.ndarray:
        generator = self._generator(len(ids) + 1)
        generator.append_tokens(np.asarray(list(ids), dtype=np.int32))
        logits = np.asarray(generator.get_output("logits"), dtype=np.float32)
        return logits.reshape(-1, logits.shape[-1])[-len(ids):]

    def greedy(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        """Greedy search by genai itself; it also stops at the eos ids of genai_config.json."""
        if max_new_tokens <= 0:
            return []
        generator = self._generator(len(ids) + max_new_tokens)
        generator.append_tokens(np.asarray(list(ids), dtype=np.int32))
        stop = {int(s) for s in stop_ids}
        generated: list[int] = []
        while len(generated) < max_new_tokens and not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            generated.append(token)
            if token in stop:
                break
        return generated

    def tokenize(self, text: str) -> list[int] | None:
        return [int(t) for t in self.tokenizer.encode(text)]

    def runtime_info(self) -> dict[str, str]:
        return {
            "runtime": self.name,
            "onnxruntime_genai": str(getattr(self._og, "__version__", "?")),
            "python": platform.python_version(),
        }


if "onnx" not in TARGETS:
    TARGETS.add("onnx", OnnxTarget())
