"""The ``gguf`` target: its precision table, the writer entry point, and the runner it opens on an artifact."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

from sovpack._io import Progress
from sovpack._protocols import Precision, RunnerTraits, WrittenArtifact
from sovpack.artifact import ArtifactMetadata
from sovpack.errors import SourceError, UsageError
from sovpack.parity.thresholds import DEFAULT_THRESHOLDS
from sovpack.quantize import QuantOptions, QuantPlan, calibrate
from sovpack.source.model import SourceModel
from sovpack.source.spec import ModelSpec
from sovpack.targets.base import copy_support_files, precision_table, register_target
from sovpack.targets.gguf.arch import FAMILIES, ArchPlan, arch_plan, plan_for, yarn_correction_range
from sovpack.targets.gguf.encoder import ENCODER_FAMILIES, encoder_parity_limits, write_encoder
from sovpack.targets.gguf.encoder_runner import LlamaCppEmbeddingRunner
from sovpack.targets.gguf.quantize import (
    FOUR_BIT,
    LLAMA_QUANTS,
    eight_bit_tensors,
    importance_matrix,
    linear_tensors,
    llama_ftype,
    llama_quantize,
    make_plan,
    resolved_method,
)
from sovpack.targets.gguf.runner import LlamaCppRunner, kv_cache_type
from sovpack.targets.gguf.runtime import import_gguf, import_llama_cpp
from sovpack.targets.gguf.tensors import Q4_0_HEAD
from sovpack.targets.gguf.tokenizer import tokenizer_from_checkpoint
from sovpack.targets.gguf.writer import read_tensor_types, write_gguf


def _row(name: str, weights: str) -> Precision:
    # llama.cpp memory-maps the file: the weights stay reclaimable page cache, not the runtime's own memory.
    # NOTE: except 4-bit ones. ggml's CPU backend repacks Q4_0 and Q4_K tensors into interleaved copies it
    # allocates (the "CPU_REPACK" buffer; llama-cpp-python 0.3.36 on x86: 229 of a 0.6B q4_k_m file's 404 MiB;
    # the 8B q4_k_m parity run held 4.1 GB, 0.51 byte a weight), so they count at the generic 4-bit width
    # (RUNTIME_BYTES_PER_WEIGHT). Q8_0, Q5_K and Q6_K stay mapped (measured: no repack buffer).
    return Precision(
        name=name, weights=weights, quantized=weights.startswith("int"), thresholds=DEFAULT_THRESHOLDS[name],
        runtime_bytes_per_weight=None if weights == "int4" else 0.0,
    )


# gguf-py writes f32 / f16 / bf16 / q8_0 itself (and q4_0 with method "rtn"); the K-quant mixes, int4 (sovpack's
# 4-bit recipe, see quantize.INT4) and q4_0 with an importance matrix are llama.cpp's quantizer's.
PRECISIONS = precision_table(
    _row("f32", "float32"),
    _row("f16", "float16"),
    _row("bf16", "bfloat16"),
    _row("q8_0", "int8"),
    _row("q4_0", "int4"),
    _row("q4_k_m", "int4"),
    _row("int4", "int4"),
    _row("q5_k_m", "int5"),
    _row("q6_k", "int6"),
)
DEFAULT_PRECISION = "f16"


def parity_limits(spec: ModelSpec, precision: str) -> dict[str, float]:
    """Parity limits llama.cpp's CPU kernels cannot meet for this model, to be applied on top of the defaults.

    ggml's CPU GELU (and GEGLU) is a lookup table indexed by the float16 rounding of its input and holding
    float16 outputs (compiled in: GGML_GELU_FP16), so a GELU model computes its MLP activations at float16
    precision (2^-11 relative) even from f32 weights and an f32 KV cache. On the Gemma fixture this gives
    9e-3 absolute / 8e-4 relative logit error where SiLU families stay at 3e-5 / 2e-6; reproducing the table
    in the numpy reference removes about half of it, the rest being inputs that land on the other side of a
    float16 rounding boundary. These limits are ~2.5-5x the measurement and 5-10x tighter than f16's;
    clear_margin follows parity's rule of 2 x max_abs so top-1 and greedy stay exact requirements. Gemma 2/3
    (sandwich norms, 3-6 layers) measure 8e-3 - 1.6e-2 absolute and a mean KL of 5e-7 - 1.0e-6 nats, at the
    default 1e-6: mean_kl is widened to 5e-6, 200x tighter than f16's.
    """
    if spec.encoder is not None:
        return encoder_parity_limits(precision)
    plan = plan_for(spec.family)
    limits: dict[str, float] = {}
    if precision == "f32" and plan.activation.startswith("gelu"):
        limits = {"max_abs": 0.05, "max_rel": 2e-3, "clear_margin": 0.1, "mean_kl": 5e-6}
    if precision == "f32" and rounded_yarn(spec):
        # llama.cpp's whole-dim YaRN ramp (see arch._check_rope): on the gpt-oss fixture (gpt-oss's own rope
        # values) 0.09 absolute / 3.7e-3 relative logit error and a mean KL of 4e-6 over the parity prompts, top-1
        # and greedy exact. The limits are ~2.5x that, f16's absolute limit and 50x tighter than f16's KL; f16 and
        # coarser precisions' defaults already cover it.
        yarn = {"max_abs": 0.25, "max_rel": 1e-2, "clear_margin": 0.5, "mean_kl": 2e-5}
        limits = {key: max(limits.get(key, 0.0), value) for key, value in yarn.items()}
    return limits


def rounded_yarn(spec: ModelSpec) -> bool:
    """The spec's YaRN ramp is untruncated, which llama.cpp rounds to whole dims."""
    return spec.rope_scaling.kind == "yarn" and spec.rope_scaling.truncate is False


@register_target
class GgufTarget:
    """``gguf``: one .gguf file, parity-checked in llama.cpp through llama-cpp-python (decoders and, as
    llama.cpp's bert or modern-bert architecture, embedding encoders: see ``encoder``)."""

    name = "gguf"
    precisions = PRECISIONS
    default_precision = DEFAULT_PRECISION
    runtime_packages = ("gguf", "llama-cpp-python")
    families = FAMILIES | ENCODER_FAMILIES

    def check_quantization(self, precision: str, options: QuantOptions) -> None:
        """llama.cpp's quantizer takes an importance matrix or nothing, in GGML's 32-wide blocks: anything else is
        refused before a build starts (``resolved_method``), not when this target's turn comes."""
        if precision in LLAMA_QUANTS:
            resolved_method(options)

    def write(self, model: SourceModel, precision: str, out_dir: Path, progress: Progress, *,
              quant: QuantOptions | None = None) -> WrittenArtifact:
        if precision not in self.precisions:
            raise UsageError(f"gguf has no precision {precision!r}; known: {', '.join(self.precisions)}")
        import_gguf()
        if model.spec.encoder is not None:
            return write_encoder(model, precision, Path(out_dir), progress)
        spec = model.spec
        plan = arch_plan(spec)  # refuses, by name, a family outside FAMILIES
        options = quant if quant is not None else QuantOptions()
        recipe = None
        if precision in LLAMA_QUANTS:
            method = resolved_method(options)  # refuses what llama.cpp's quantizer lacks, before any work
            import_llama_cpp()
            recipe = self._recipe(model, plan, precision, options, method, progress)
        # gguf-py's q4_0 is llama.cpp's plain q4_0 (the same reference rounding, head at Q8_0): llama.cpp's
        # quantizer is needed only to use an importance matrix or the plan's Q8_0 tensors.
        by_llama = recipe is not None and (precision != "q4_0" or bool(recipe[0]) or len(recipe[1]) > 1)
        from sovpack.parity.prompts import TOKENIZER_CORPUS

        fallback = {
            "bos": spec.bos_token_id,
            "eos": spec.eos_token_ids[0] if spec.eos_token_ids else None,
            "pad": spec.pad_token_id,
        }
        tok = tokenizer_from_checkpoint(
            model.checkpoint,
            vocab_size=spec.vocab_size,
            model_name=model.name,
            fallback_ids=fallback,
            corpus=TOKENIZER_CORPUS,
        )
        filename = f"{model.name}-{precision}.gguf"
        out = Path(out_dir) / filename
        quant_meta: dict[str, Any] | None = None
        ftype = ""
        if by_llama:
            assert recipe is not None
            ftype = llama_ftype(precision, options)
            imatrix, q8_0, quant_meta = recipe
            # The intermediate holds the checkpoint's values exactly: its own 16-bit type when it has only one
            # (half the bytes of f32 to write and read again: 16 GB instead of 32 for an 8B bf16 model).
            stored = set(model.checkpoint.stored_dtypes())
            base = {frozenset({"F16"}): "f16", frozenset({"BF16"}): "bf16"}.get(frozenset(stored), "f32")
            intermediate = Path(out_dir) / f".{model.name}-{base}.intermediate.gguf"
            try:
                stats = write_gguf(model, base, intermediate, progress, tok=tok, plan=plan)
                progress(f"gguf {precision}: llama.cpp quantize", 0, 1)
                llama_quantize(intermediate, out, ftype, imatrix=imatrix, q8_0=q8_0)
                progress(f"gguf {precision}: llama.cpp quantize", 1, 1)
            finally:
                with contextlib.suppress(OSError):  # cleanup only: the original error is what the caller needs
                    intermediate.unlink()
            quantizer = f"llama.cpp llama_model_quantize ({ftype}) from an {base} intermediate"
            if imatrix:
                quantizer += ", with an importance matrix from sovpack's calibration"
        else:
            stats = write_gguf(model, precision, out, progress, tok=tok, plan=plan)
            quantizer = "gguf-py"
            if recipe is not None:  # q4_0, plain rounding, no 8-bit share
                quant_meta = recipe[2]
        # llama.cpp reads only the .gguf; tokenizer.json & co. ride along for `sovpack run` and provenance.
        support = copy_support_files(model, Path(out_dir))
        # gguf-py's file holds the types this writer chose; llama.cpp's quantizer picks its own per tensor, so its
        # file is read back (the header alone still parses every vocabulary string: ~0.8 s at a 32k vocabulary)
        types = read_tensor_types(out) if by_llama else dict(sorted(stats.types.items()))
        if by_llama:
            for kind, count in types.items():
                if kind not in ("F32", "Q8_0", "Q4_0", "Q4_1") and not kind.endswith("_K"):
                    stats.fallbacks.append(
                        f"llama.cpp stored {count} tensor(s) as {kind}: rows not a multiple of the 256-wide K blocks"
                    )
        limits = parity_limits(spec, precision)
        format_metadata: dict[str, Any] = {
            "gguf_file": filename,
            "architecture": plan.name,
            "qk_permuted_for_interleaved_rope": plan.permute_qk,
            "quantizer": quantizer,
            "tensor_types": types,
            "fallbacks": stats.fallbacks,
            "kv_cache_type": kv_cache_type(precision),
            "tokenizer": tok.summary(),
            "notes": _notes(spec, plan, precision, limits),
        }
        if quant_meta is not None:
            # The plan counts its 4-bit tensors; llama.cpp's mix picks each one's GGML type (tensor_types).
            format_metadata["quantization"] = {**quant_meta, "llama_cpp_mix": ftype if by_llama else None}
        traits = RunnerTraits(parity_limits=limits, known_tokenizer_divergences=tuple(tok.divergent_texts))
        return WrittenArtifact(files=(filename, *support), format_metadata=format_metadata, traits=traits)

    @staticmethod
    def _recipe(model: SourceModel, plan: ArchPlan, precision: str, options: QuantOptions, method: str | None,
                progress: Progress) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
        """(importance matrix, tensors forced to Q8_0, metadata) for llama.cpp's quantizer.

        4-bit precisions follow sovpack's plan (calibration, sensitivity, the 8-bit share); q5_k_m / q6_k
        only take the importance matrix (their mix already keeps the sensitive tensors at 6-8 bits).
        """
        tensors = linear_tensors(model, plan)
        qplan: QuantPlan | None = None
        if precision in FOUR_BIT:
            qplan = make_plan(model, options, progress, label=f"gguf:{precision}: quantization plan")
            calib = qplan.calibration
        else:
            progress(f"gguf:{precision}: calibration", 0, 1)
            calib = None if method == "rtn" else calibrate(model, text_file=options.calibration)
            progress(f"gguf:{precision}: calibration", 1, 1)
        imatrix = importance_matrix(tensors, calib) if calib is not None else {}
        q8_0 = eight_bit_tensors(tensors, qplan) if qplan is not None else []
        if precision == "q4_0" and tensors[-1].name not in q8_0:
            q8_0.append(tensors[-1].name)  # the head, Q8_0 as gguf-py's q4_0 stores it (tensors.Q4_0_HEAD)
        meta: dict[str, Any] = dict(qplan.to_dict()) if qplan is not None else {
            "method": method, "options": options.to_dict(),
            "calibration": calib.to_dict() if calib is not None else None}
        meta["imatrix"] = {
            "tensors": len(imatrix),
            "calibration_tokens": calib.tokens if calib is not None else 0,
            "text_sha256": calib.text_sha256 if calib is not None else None,
            "source": calib.source if calib is not None else None,
        } if imatrix else None
        meta["q8_0_overrides"] = q8_0
        return imatrix, q8_0, meta

    def open_runner(self, artifact_dir: Path, metadata: ArtifactMetadata) -> LlamaCppRunner:
        fmt = metadata.format_metadata
        return LlamaCppRunner(
            gguf_file(Path(artifact_dir), fmt.get("gguf_file")),
            spec=metadata.spec,
            kv_cache=str(fmt.get("kv_cache_type") or kv_cache_type(metadata.precision)),
            traits=metadata.traits,
        )

    def open_embedding_runner(self, artifact_dir: Path, metadata: ArtifactMetadata) -> LlamaCppEmbeddingRunner:
        fmt = metadata.format_metadata
        spec = metadata.spec
        if spec.encoder is None:
            raise UsageError(f"{artifact_dir}: {spec.family} is not an embedding encoder")
        max_len = fmt.get("max_seq_length")
        return LlamaCppEmbeddingRunner(
            gguf_file(Path(artifact_dir), fmt.get("gguf_file")),
            spec=spec,
            normalize=bool(fmt.get("normalize", spec.encoder.pooling.normalize)),
            max_seq_length=max_len if isinstance(max_len, int) else spec.encoder.pooling.max_seq_length,
            traits=metadata.traits,
        )


def gguf_file(artifact_dir: Path, name: object) -> Path:
    """The artifact's .gguf: the file its metadata names, else the only .gguf in the directory."""
    if isinstance(name, str) and name and (artifact_dir / name).is_file():
        return artifact_dir / name
    found = sorted(artifact_dir.glob("*.gguf"))
    if len(found) != 1:
        raise SourceError(f"{artifact_dir}: expected one .gguf file, found {len(found)}")
    return found[0]


def _notes(spec: ModelSpec, plan: ArchPlan, precision: str, limits: dict[str, float]) -> list[str]:
    notes = []
    if spec.sliding_window is not None and plan.swa_period is None:
        notes.append(
            f"the source uses a {spec.sliding_window}-token sliding window, which llama.cpp's "
            f"{plan.name} architecture does not apply; the file's context_length and the runner's "
            "context are capped at the window, where both agree"
        )
    if spec.sliding_window is not None and plan.swa_pattern_key:
        notes.append(
            f"llama.cpp's {plan.name} applies the {spec.sliding_window}-token sliding window to the source's "
            "sliding layers (attention.sliding_window_pattern lists them)"
        )
    elif spec.sliding_window is not None and plan.swa_period is not None:
        notes.append(
            f"llama.cpp's {plan.name} applies the {spec.sliding_window}-token sliding window with its fixed "
            f"layer pattern (every {plan.swa_period}th layer full), which is the source's"
        )
    if spec.rope_scaling.kind == "longrope":
        notes.append(
            "LongRoPE: llama.cpp picks the long factors when its context size exceeds "
            f"{spec.rope_scaling.original_max_position_embeddings} (rope.scaling.original_context_length), the "
            "source when a forward pass sees more positions than that; they agree within one regime, and the "
            "runner checks parity in the short one"
        )
    if precision == "q4_0":
        notes.append(f"the output head is stored as {Q4_0_HEAD}: a 4-bit head moves every logit")
    s = spec.rope_scaling
    if s.kind == "yarn" and ((s.beta_fast or 32.0) != 32.0 or (s.beta_slow or 1.0) != 1.0):
        notes.append(
            "YaRN betas differ from llama.cpp's defaults (32, 1); the file records them "
            "(rope.scaling.yarn_beta_fast/slow) but most llama.cpp architectures ignore those keys: pass "
            f"yarn_beta_fast={s.beta_fast} / yarn_beta_slow={s.beta_slow} when running it (sovpack's runner does)"
        )
    if rounded_yarn(spec):
        low, high = yarn_correction_range(spec)
        notes.append(
            f"YaRN with truncate=false: the source's correction range is dims {low:.3g}..{high:.3g}, llama.cpp "
            f"rounds it to {max(0, math.floor(low))}..{min(spec.rotary_size - 1, math.ceil(high))}, so rotation "
            "angles differ slightly and the difference grows with the position (parity measures it on the "
            "parity prompts; long contexts drift further)"
        )
    if limits and plan.activation.startswith("gelu"):
        notes.append(
            "llama.cpp's CPU GELU is a float16 lookup table: parity limits are widened for this f32 artifact "
            "(parity_limits)"
        )
    return notes
