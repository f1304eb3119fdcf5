"""llama.cpp's quantizer (``llama_model_quantize``) fed with sovpack's calibration: q4_0, q4_k_m, q5_k_m, q6_k
and the ``int4`` recipe.

The gguf writer first writes an f32 (or, for an all-f16 checkpoint, f16) intermediate GGUF; llama.cpp's
quantizer picks each tensor's type from that (its mix) and the intermediate is deleted. Two inputs steer it:

- an importance matrix (llama.cpp's ``imatrix``): per GGUF tensor, the mean x^2 of each input column over the
  calibration text, measured by the numpy reference (``sovpack.quantize.calibrate``). llama.cpp's rounding
  minimises the error weighted by it instead of the plain squared error. Tensors reading one input (q/k/v,
  gate/up, and the fused qkv / gate_up of phi3) share its statistics; a stacked expert tensor gets its
  experts' rows one after another (n_experts x K), as llama.cpp's imatrix tool lays them out.
- tensor-type overrides (``tt_overrides``, regex -> GGML type): the plan's most sensitive tensors at Q8_0.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sovpack._io import Progress, no_progress
from sovpack.errors import ConversionError, UsageError
from sovpack.quantize import Calibration, QuantOptions, QuantPlan, plan_quantization
from sovpack.source.model import SourceModel
from sovpack.targets.gguf.arch import ArchPlan
from sovpack.targets.gguf.runtime import N_THREADS, import_gguf, import_llama_cpp, quiet_llama

# precision -> llama.cpp's file type constant
LLAMA_QUANTS = {
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "int4": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
}
# The precisions sovpack's 4-bit plan (QuantOptions, the 8-bit share) steers.
FOUR_BIT = ("q4_0", "q4_k_m", "int4")
# int4 by QuantOptions.symmetric: llama.cpp's asymmetric 4-bit mix, or its symmetric Q4_0 blocks.
# NOTE: mean KL over the parity prompts in llama.cpp, (plain llama.cpp -> + sovpack's imatrix -> + the plan's
# Q8_0 tensors, int8_share 0.125). Real SmolLM2-135M: q4_k_m 0.090 -> 0.057 -> 0.038 (PASSED; its 576-wide
# rows fall back to Q5_0, 110 MB); q4_0 >0.4 FAILED -> 0.295 -> 0.201 (WARNED, 99 MB). Realistic-numerics
# llama3 / qwen2: q4_k_m 0.090 / 0.108 -> 0.090 / 0.099 -> 0.085 / 0.089; q4_0 0.133 / 0.148 -> 0.119 / 0.128;
# a Q4_1 mix with both 0.094 / 0.094 (and on SmolLM2, whose weights lie on a Q4_1 grid, a flattering 0.0065).
# So int4 = the q4_k_m mix with both: best on the unflattered fixtures, and under 0.045 on SmolLM2 without
# leaning on its grid.
INT4_FTYPES = {False: "LLAMA_FTYPE_MOSTLY_Q4_K_M", True: "LLAMA_FTYPE_MOSTLY_Q4_0"}

# The GGML block every 4/8-bit type of the recipes shares at its finest level (Q4_0/Q4_1/Q8_0 blocks, K-quant
# sub-blocks): the "group size" of a GGUF 4-bit artifact.
GGUF_GROUP = 32

# GGUF tensor kind (gguf.MODEL_TENSOR member) -> the canonical tensors (of layer i) it holds, in row order; the
# first one names the input whose statistics the tensor gets.
LAYER_KINDS: dict[str, tuple[str, ...]] = {
    "ATTN_Q": ("q",),
    "ATTN_K": ("k",),
    "ATTN_V": ("v",),
    "ATTN_QKV": ("q", "k", "v"),
    "ATTN_OUT": ("o",),
    "FFN_GATE": ("gate",),
    "FFN_UP": ("up",),
    "FFN_DOWN": ("down",),
}
EXPERT_KINDS = {"FFN_GATE_EXP": "gate", "FFN_UP_EXP": "up", "FFN_DOWN_EXP": "down"}
HEAD = "lm_head"


@dataclass(frozen=True, slots=True)
class LinearTensor:
    """One quantizable GGUF tensor and the canonical tensors behind it."""

    name: str  # GGUF name, e.g. "blk.3.attn_q.weight"
    members: tuple[str, ...]  # canonical tensors stored in it (several when fused)
    experts: int = 0  # >0: a stacked [experts, rows, K] tensor; members are then per-expert name templates


def llama_ftype(precision: str, options: QuantOptions) -> str:
    """llama.cpp's file type constant (name) for ``precision``; int4 follows the symmetric option."""
    return INT4_FTYPES[options.symmetric] if precision == "int4" else LLAMA_QUANTS[precision]


def group_for(bits: int, cols: int) -> int | None:
    """GGML's 4/8-bit blocks are 32 wide; a row length they do not divide has no 4-bit type (8-bit: Q8_0 would
    fall back too, and llama.cpp's fallback decides)."""
    return GGUF_GROUP if cols % GGUF_GROUP == 0 else None


def linear_tensors(model: SourceModel, plan: ArchPlan) -> list[LinearTensor]:
    """The GGUF tensors llama.cpp quantizes with an imatrix, named with gguf-py's tables (the writer's names)."""
    gguf = import_gguf()
    spec = model.spec
    names = gguf.TENSOR_NAMES
    kinds = gguf.MODEL_TENSOR
    found: list[LinearTensor] = []
    for i in range(spec.num_layers):
        layer = {kind: tuple(f"layers.{i}.{m}" for m in members) for kind, members in LAYER_KINDS.items()}
        if plan.fused_gate_up:  # phi3: ffn_up holds gate then up, read from one input
            layer["FFN_UP"] = (f"layers.{i}.gate", f"layers.{i}.up")
        kept: tuple[str, ...] = ("ATTN_QKV",) if plan.fused_qkv else ("ATTN_Q", "ATTN_K", "ATTN_V")
        kept += ("ATTN_OUT",)
        if spec.is_sparse(i) and spec.moe is not None:
            for kind, proj in EXPERT_KINDS.items():
                found.append(LinearTensor(name=names[kinds[kind]].format(bid=i) + ".weight",
                                          members=(f"layers.{i}.experts.{{e}}.{proj}",),
                                          experts=spec.moe.num_experts))
        else:
            kept += ("FFN_UP", "FFN_DOWN") if plan.fused_gate_up else ("FFN_GATE", "FFN_UP", "FFN_DOWN")
        found.extend(LinearTensor(name=names[kinds[k]].format(bid=i) + ".weight", members=layer[k]) for k in kept)
    head = names[kinds.TOKEN_EMBD if spec.tie_word_embeddings else kinds.OUTPUT] + ".weight"
    found.append(LinearTensor(name=head, members=(HEAD,)))
    return found


def importance_matrix(tensors: Sequence[LinearTensor], calib: Calibration) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 importance (mean x^2 per input column; n_experts x K for expert stacks).

    An expert the calibration text never routed to gets its layer's mean over the routed experts: llama.cpp
    needs the whole stack, and the average input is the best guess for an unseen one.
    """
    matrix: dict[str, np.ndarray] = {}
    for tensor in tensors:
        if tensor.experts:
            rows = [calib.importance(tensor.members[0].format(e=e)) for e in range(tensor.experts)]
            seen = [r for r in rows if r is not None]
            if not seen:
                continue
            fill = np.mean(seen, axis=0).astype(np.float32)
            matrix[tensor.name] = np.concatenate([fill if r is None else r for r in rows]).astype(np.float32)
            continue
        found = calib.importance(tensor.members[0])
        if found is not None:
            matrix[tensor.name] = np.ascontiguousarray(found, dtype=np.float32)
    return matrix


def eight_bit_tensors(tensors: Sequence[LinearTensor], plan: QuantPlan) -> list[str]:
    """GGUF tensors holding a canonical tensor the plan keeps at 8 bits (a fused tensor follows its members)."""
    return [t.name for t in tensors
            if not t.experts and any(m in plan.tensors and plan.tensors[m].bits == 8 for m in t.members)]


def resolved_method(options: QuantOptions) -> str:
    """The method the gguf target runs: llama.cpp's quantizer takes an importance matrix ("weighted") or
    nothing ("rtn": its plain recipe); it has no GPTQ input."""
    if options.method in ("gptq", "awq"):
        raise UsageError(f"gguf: llama.cpp's quantizer takes an importance matrix (method 'weighted', the default) "
                         f"or none (method 'rtn'); it has no input for method {options.method!r} (GGUF stores no "
                         f"per-channel input scales, and no GPTQ-style error compensation; a build gives gguf "
                         f"targets their own method under [quantization.targets.\"gguf:...\"])")
    if options.group_size not in (None, GGUF_GROUP):
        raise UsageError(f"gguf: the 4-bit types use GGML's {GGUF_GROUP}-wide blocks; group size "
                         f"{options.group_size} is not available (leave it unset or give {GGUF_GROUP}; a build can "
                         f"give other targets theirs under [quantization.targets.\"FORMAT:int4\"] in sovpack.toml)")
    return "rtn" if options.method == "rtn" else "weighted"


def make_plan(model: SourceModel, options: QuantOptions, progress: Progress = no_progress,
              label: str = "gguf: quantization plan") -> QuantPlan:
    """sovpack's plan for this conversion: calibration, per-tensor sensitivity and the 8-bit choice.

    NOTE: the plan is computed with method "weighted" even for "auto": GPTQ's Hessians would only rank
    the tensors (llama.cpp rounds them), and cost ~0.9 GB and minutes on SmolLM2-135M.
    """
    method = resolved_method(options)
    plan = plan_quantization(model, QuantOptions(method=method, group_size=options.group_size,
                                                 symmetric=options.symmetric, calibration=options.calibration,
                                                 int8_share=options.int8_share), group_for,
                              progress=progress, label=label)
    plan.options = options  # what the user asked, recorded as asked; plan.method is what ran
    return plan


@contextlib.contextmanager
def _keep(*objects: Any) -> Any:
    """Hold ctypes buffers alive for the duration of the C call that reads them."""
    yield objects


def llama_quantize(
    src: Path,
    dst: Path,
    ftype: str,
    *,
    imatrix: Mapping[str, np.ndarray] | None = None,
    q8_0: Sequence[str] = (),
    threads: int = N_THREADS,
) -> None:
    """Quantize a GGUF with llama.cpp's own quantizer, into ``dst`` via a temporary sibling.

    ``imatrix``: GGUF tensor name -> importance (see ``importance_matrix``); ``q8_0``: GGUF tensor names
    stored as Q8_0 whatever the mix would choose.
    """
    llama_cpp = import_llama_cpp()
    gguf = import_gguf()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.nthread = threads
    buffers: list[Any] = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for n, (name, values) in enumerate(imatrix.items()):
            data = np.ascontiguousarray(values, dtype=np.float32)
            buffers.append(data)
            entries[n].name = name.encode()
            entries[n].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[n].size = data.size
        entries[len(imatrix)].name = None
        buffers.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if q8_0:
        overrides = (llama_cpp.llama_model_tensor_override * (len(q8_0) + 1))()
        for n, name in enumerate(q8_0):
            overrides[n].pattern = ("^" + re.escape(name) + "$").encode()
            overrides[n].type = int(gguf.GGMLQuantizationType.Q8_0)
        overrides[len(q8_0)].pattern = None
        buffers.append(overrides)
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        with quiet_llama(), _keep(*buffers):
            llama_cpp.llama_backend_init()
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise ConversionError(
                f"llama.cpp could not quantize {src.name} to {ftype} (llama_model_quantize returned {rc})"
            )
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(OSError):  # cleanup only: gone after the rename, or never written
            tmp.unlink()
