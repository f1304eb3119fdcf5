"""Which tensors get 4 bits and which stay 8, how each is rounded, and the rounding itself.

Mixed precision by measured sensitivity: every linear tensor is rounded to 4 bits once (round-to-nearest,
cheap), and its relative output error on the calibration inputs, ``E|dW x|^2 / E|W x|^2`` (with the input
Hessian when kept, else with the per-channel energies), ranks it. The most sensitive tensors, up to
``int8_share`` of the linear parameters, stay 8-bit; a tensor whose input size no group size the target
offers divides stays 8-bit too (per tensor, never a failure).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sovpack._io import Progress, no_progress
from sovpack.quantize.cache import CodesCache
from sovpack.quantize.calibration import Calibration, calibrate
from sovpack.quantize.gptq import gptq_quantize
from sovpack.quantize.groups import GroupCodes, fit_groups, quantize_rtn, rtn_error
from sovpack.quantize.options import QuantOptions
from sovpack.quantize.scaling import output_error, search_input_scale
from sovpack.source.model import SourceModel

# (bits, input size) -> the group size the target stores for it, or None when none divides the input.
GroupChooser = Callable[[int, int], int | None]
SENSITIVITY_SCALE_DTYPE = np.float16  # the scales of the sensitivity pass, whatever the target stores


@dataclass(frozen=True, slots=True)
class TensorPlan:
    bits: int
    group_size: int
    sensitivity: float | None = None  # relative output error at 4 bits (None: not measured)
    # Activation-aware weight scale per input channel [in] (method "awq"): the codes are of weight * scale and
    # the target multiplies the input by 1 / scale; None: no scaling.
    input_scale: np.ndarray | None = None


@dataclass
class QuantPlan:
    """The resolved 4-bit recipe of one conversion."""

    options: QuantOptions
    method: str  # "rtn", "weighted", "gptq" or "awq" ("auto" resolved)
    tensors: dict[str, TensorPlan] = field(default_factory=dict)
    calibration: Calibration | None = None
    scale_dtype: type = np.float16
    # False: zero points are floats in the scale's dtype (the runtime's format allows it), so a group's
    # range is not snapped to a multiple of its step.
    integer_zero: bool = True
    cache: CodesCache | None = field(default=None, repr=False, compare=False)  # a build's shared 4-bit codes

    def bits(self, name: str) -> int:
        return self.tensors[name].bits

    def input_multiplier(self, name: str) -> np.ndarray | None:
        """What the target multiplies ``name``'s input by before the quantized matmul (float32 [in]), or None."""
        scale = self.tensors[name].input_scale if name in self.tensors else None
        return None if scale is None else (1.0 / scale).astype(np.float32)

    def effective_weight(self, name: str, codes: GroupCodes) -> np.ndarray:
        """The float weight [out, in] the runtime computes with for ``codes`` (the input scaling undone)."""
        multiplier = self.input_multiplier(name)
        weight = codes.dequantize()
        return weight if multiplier is None else weight * multiplier

    def to_dict(self) -> dict[str, Any]:
        """What the artifact metadata and provenance record."""
        int8 = sorted(n for n, t in self.tensors.items() if t.bits == 8)
        groups = sorted({t.group_size for t in self.tensors.values() if t.bits == 4})
        return {
            "method": self.method,
            "options": self.options.to_dict(),
            "int4_tensors": sum(1 for t in self.tensors.values() if t.bits == 4),
            "scaled_tensors": sum(1 for t in self.tensors.values() if t.input_scale is not None),
            "int8_tensors": int8,
            "int4_group_sizes": groups,
            "calibration": self.calibration.to_dict() if self.calibration is not None else None,
        }

    def codes(self, name: str, load: Callable[[], np.ndarray]) -> GroupCodes:
        """``quantize(name, load())``, or the codes another target of this build already fitted with the same
        recipe (``cache``; then the weight is not read at all)."""
        tensor = self.tensors[name]
        if self.cache is None or tensor.bits != 4:
            return self.quantize(name, load())
        scaled = None if tensor.input_scale is None else hashlib.sha256(tensor.input_scale.tobytes()).hexdigest()
        key = (name, tensor.bits, tensor.group_size, self.method, self.options.symmetric,
               np.dtype(self.scale_dtype).str, self.integer_zero, scaled, calibration_key(self.calibration))
        kept = self.cache.get(key)
        if kept is not None:
            return kept
        codes = self.quantize(name, load())
        self.cache.put(key, codes)
        return codes

    def quantize(self, name: str, weight: np.ndarray) -> GroupCodes:
        """The codes of canonical tensor ``name`` [out, in] under this plan."""
        tensor = self.tensors[name]
        calib = self.calibration
        importance = calib.importance(name) if calib is not None else None
        hessian = calib.hessian(name) if calib is not None else None
        if tensor.input_scale is not None:  # codes of weight * s; the input is divided by s at run time
            scale = tensor.input_scale
            weight = np.asarray(weight, dtype=np.float32) * scale
            importance = None if importance is None else importance / (scale * scale)
            hessian = None if hessian is None else hessian / np.outer(scale, scale)
        if self.method in ("gptq", "awq") and hessian is not None:
            return gptq_quantize(weight, hessian, bits=tensor.bits, group_size=tensor.group_size,
                                 symmetric=self.options.symmetric, scale_dtype=self.scale_dtype,
                                 integer_zero=self.integer_zero)
        if self.method == "rtn":
            return quantize_rtn(weight, bits=tensor.bits, group_size=tensor.group_size,
                                symmetric=self.options.symmetric, scale_dtype=self.scale_dtype)
        return fit_groups(weight, bits=tensor.bits, group_size=tensor.group_size, symmetric=self.options.symmetric,
                          importance=importance, scale_dtype=self.scale_dtype,
                          integer_zero=self.integer_zero)


def linear_tensors(model: SourceModel) -> dict[str, tuple[int, ...]]:
    """The decoder's quantizable linear weights (canonical name -> [out, in]); embedding, head, routers excluded."""
    return {name: shape for name, shape in model.spec.tensor_shapes().items()
            if len(shape) == 2 and name not in ("embed", "lm_head") and not name.endswith(".router")}


def calibration_key(calib: Calibration | None) -> tuple[object, ...] | None:
    """What identifies a calibration's statistics within one opened model (its text, source and size)."""
    return None if calib is None else (calib.text_sha256, calib.source, calib.tokens, calib.has_hessians)


def relative_error(weight: np.ndarray, codes: GroupCodes, calib: Calibration | None, name: str) -> float:
    """E|dW x|^2 / E|W x|^2 over the calibration inputs (diagonal approximation without a Hessian)."""
    hessian = calib.hessian(name) if calib is not None else None
    h = None if hessian is None else hessian.astype(np.float32)
    imp = calib.importance(name) if calib is not None else None
    channel = np.ones(weight.shape[1], dtype=np.float32) if imp is None else imp
    return output_error(codes.dequantize() - weight, channel, h) / max(output_error(weight, channel, h), 1e-30)


def plan_quantization(model: SourceModel, options: QuantOptions, group_for: GroupChooser, *,
                      scale_dtype: type = np.float16, integer_zero: bool = True,
                      progress: Progress = no_progress, label: str = "quantization plan") -> QuantPlan:
    """Calibrate (unless the method is plain rtn), measure every linear tensor's 4-bit sensitivity and decide;
    ``progress`` hears ``label`` with the tensors measured so far."""
    method = options.method
    calib = None
    if method != "rtn":
        progress(f"{label}: calibration", 0, 1)
        calib = calibrate(model, text_file=options.calibration, hessians=method in ("auto", "gptq", "awq"))
        progress(f"{label}: calibration", 1, 1)
        if method == "auto":
            method = "gptq" if calib.has_hessians else "weighted"
    cache = None if model.scratch is None else CodesCache(model.scratch / "codes")
    plan = QuantPlan(options=options, method=method, calibration=calib, scale_dtype=scale_dtype,
                     integer_zero=integer_zero, cache=cache)
    shapes = linear_tensors(model)
    sizes: dict[str, int] = {}
    progress(label, 0, len(shapes))
    for done, (name, (rows, cols)) in enumerate(shapes.items(), start=1):
        progress(label, done, len(shapes))
        group = group_for(4, cols)
        if group is None:  # no group divides this input: the whole tensor stays 8-bit
            plan.tensors[name] = TensorPlan(bits=8, group_size=group_for(8, cols) or cols)
            continue
        sensitivity, scale = _sensitivity(model, name, group, method, options.symmetric, integer_zero, calib)
        plan.tensors[name] = TensorPlan(bits=4, group_size=group, sensitivity=sensitivity, input_scale=scale)
        sizes[name] = rows * cols
    budget = options.int8_share * sum(rows * cols for rows, cols in shapes.values())
    spent = sum(rows * cols for name, (rows, cols) in shapes.items() if plan.tensors[name].bits == 8)
    ranked = sorted(sizes, key=lambda n: -(plan.tensors[n].sensitivity or 0.0))
    for name in ranked:
        if spent + sizes[name] > budget:
            continue
        cols = shapes[name][1]
        plan.tensors[name] = TensorPlan(bits=8, group_size=group_for(8, cols) or cols,
                                        sensitivity=plan.tensors[name].sensitivity)
        spent += sizes[name]
    return plan


def _sensitivity(model: SourceModel, name: str, group: int, method: str, symmetric: bool, integer_zero: bool,
                 calib: Calibration | None) -> tuple[float, np.ndarray | None]:
    """(relative output error at 4 bits, the activation-aware input scale or None) of one tensor.

    Measured with float16 scales whatever the target stores (the ranking does not depend on it), so the
    measurement is the same for every target with the same groups and is kept on ``model``: a build's 4-bit
    targets (onnx, openvino, gguf) measure each tensor once.
    """
    importance = calib.importance(name) if calib is not None else None
    awq = method == "awq" and importance is not None
    key = ("sensitivity", name, group, symmetric, integer_zero if awq else None, awq, calibration_key(calib))
    kept = model.derived.get(key)
    if kept is not None:
        return kept  # type: ignore[return-value]
    weight = model.tensor(name, np.float32)
    if awq and calib is not None and importance is not None:
        scale, sensitivity = search_input_scale(weight, importance, calib.hessian(name), bits=4, group_size=group,
                                                symmetric=symmetric, scale_dtype=SENSITIVITY_SCALE_DTYPE,
                                                integer_zero=integer_zero)
        result = (sensitivity, scale)
    elif calib is not None and calib.hessian(name) is not None:
        codes = quantize_rtn(weight, bits=4, group_size=group, symmetric=symmetric,
                             scale_dtype=SENSITIVITY_SCALE_DTYPE)
        result = (relative_error(weight, codes, calib, name), None)
    else:  # the diagonal approximation, without materialising the codes (blocks of rows on every core)
        channel = importance if importance is not None else np.ones(weight.shape[1], dtype=np.float32)
        error, norm = rtn_error(weight, channel, bits=4, group_size=group, symmetric=symmetric,
                                scale_dtype=SENSITIVITY_SCALE_DTYPE)
        result = (error / max(norm, 1e-30), None)
    model.derived[key] = result
    return result
