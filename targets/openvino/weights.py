"""Weights for the OpenVINO graph: one postponed constant per canonical tensor, in the artifact's precision.

Every weight enters the graph as an ``openvino.utils.make_postponed_constant``: the graph holds only a small
callable, and ``ov.save_model`` calls it while it writes the ``.bin``, then drops the data. Reading, converting
and quantizing therefore happen one tensor at a time, *during* serialization, and peak memory stays near the
largest tensor instead of the whole model (see benchmarks/convert_memory.py).

Precisions and the subgraphs they produce (the patterns OpenVINO's CPU plugin recognises as compressed
weights and decompresses on the fly, rather than folding them back to f32 at compile time):

- ``fp32``: ``Const f32``.
- ``fp16``: ``Const f16 -> Convert f32`` with the ``decompression`` rt_info mark, as
  ``ov.save_model(compress_to_fp16=True)`` writes it. That pass skips postponed constants and Python cannot
  set the mark, so :func:`precise.mark_fp16_decompression` adds it to the saved IR (a documented IR attribute).
- ``int8`` (asymmetric) / ``int8_sym``: per output channel, ``Const u8|i8 -> Convert f16 [-> Subtract zero
  point] -> Multiply f16 scale -> Convert f32``.
- ``int4`` (asymmetric) / ``int4_sym``: groups of ``group_size`` input features, ``Const u4|i4 [out, groups,
  group] -> Convert f16 [-> Subtract] -> Multiply -> Reshape [out, in] -> Convert f32``. Embedding and LM head
  stay 8-bit (asymmetric), as do layers whose input size no supported group size divides.

These are the subgraphs NNCF's ``compress_weights`` emits (f16 scales, zero points in the weight's own type),
except that a 4-bit plan with float zero points stores them as an ``f16`` constant subtracted directly.
NOTE: sovpack quantizes itself instead of calling NNCF: ``import nncf`` imports torch whenever torch is
installed (sovpack has no torch at run time), and NNCF needs the whole model in memory, which postponed
constants avoid. 8-bit tensors are plain min/max (asymmetric) or absmax (symmetric) round-to-nearest per
channel. A dense decoder's 4-bit linear layers follow a ``sovpack.quantize.QuantPlan`` (calibrated range
search or GPTQ, the most sensitive tensors kept 8-bit per channel); mixture-of-experts checkpoints keep the
round-to-nearest groups of :func:`quantize` (their experts are stacked into one constant per layer, which
needs one layout for every expert).

NOTE (float zero points, measured on OpenVINO 2026.4's CPU plugin, u4 [8192, 8192] in groups of 32): with an
``f16`` zero point constant feeding the Subtract, the compiled model still has one ``FullyConnected`` whose
weight input is the ``u4`` constant, with the scale and zero point as f32 [8192, 256] decompression inputs
(compile-time peak RSS +108 MB against +99 MB with u4 zero points; the f32 weight would be 256 MB), both at
PARITY_CONFIG and at the plugin's defaults (bf16 activations). So the pattern is kept and the plan's float
zero points (each group's range not snapped to its step) cost 1.5 bytes per group more in the file only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from sovpack._io import Progress, parallel_all_finite, parallel_copyto
from sovpack.errors import ConversionError
from sovpack.source.model import SourceModel
from sovpack.source.spec import ModelSpec
from sovpack.targets.halves import check_fits_float16

if TYPE_CHECKING:
    from sovpack.quantize import GroupCodes, QuantPlan

FLOAT16_ADVICE = "use openvino:fp32 or an integer precision"
INT4_GROUP_SIZES = (128, 64, 32, 16)
# NOTE: the preferred 4-bit group of a planned (calibrated) conversion (sovpack.quantize.options decides it for
# both ONNX and OpenVINO). Parity mean KL of openvino:int4 with the
# default plan (gptq, 1/8 of the linear weights 8-bit, f16 zero points) by preferred group:
#   group   realistic llama3 / qwen2   SmolLM2-135M (576 wide: 128 falls back to 64 but for down_proj)
#   128     0.062 / 0.084              (not measured)
#   64      0.050 / 0.065              0.103
#   32      0.039 / 0.048              0.0030 (its weights lie on a Q4_1 grid of
#                                      blocks of 32 that groups of 32 with float zero points recover: flattering)
# (before the plan, RTN with u4 zero points in groups of 64: 0.074 / 0.101, SmolLM2 0.556 FAILED). Groups of
# 32 store 5.0 bits per 4-bit weight (an f16 scale and zero point per group) against 4.5 at 64: 11% more
# bytes for those tensors, for about a quarter less KL on the realistic fixtures (the honest measure here):
# hence 32 below 6B parameters; from 6B, 128 (options' NOTE: the CPU plugin's memory at 8B).
_T = TypeVar("_T")


@dataclass(frozen=True, kw_only=True, slots=True)
class Scheme:
    """How one precision stores weights."""

    name: str
    kind: str  # "float" or "int"
    float_dtype: Any = np.float32  # float kinds: the stored dtype
    bits: int = 8  # int kinds
    symmetric: bool = False  # int kinds
    group_size: int | None = None  # int4: preferred group size (None = choose from the spec)


SCHEMES: dict[str, Scheme] = {
    "fp32": Scheme(name="fp32", kind="float", float_dtype=np.float32),
    "fp16": Scheme(name="fp16", kind="float", float_dtype=np.float16),
    "int8": Scheme(name="int8", kind="int", bits=8, symmetric=False),
    "int8_sym": Scheme(name="int8_sym", kind="int", bits=8, symmetric=True),
    "int4": Scheme(name="int4", kind="int", bits=4, symmetric=False),
    "int4_sym": Scheme(name="int4_sym", kind="int", bits=4, symmetric=True),
}


def choose_group_size(in_features: int, preferred: int) -> int | None:
    """The largest supported group size <= ``preferred`` that divides ``in_features``; None if there is none."""
    for size in INT4_GROUP_SIZES:
        if size <= preferred and in_features % size == 0:
            return size
    return None


def planned_group_chooser(preferred: int) -> Callable[[int, int], int | None]:
    """``group_for`` of ``plan_quantization``: 4-bit groups of the largest supported size <= ``preferred``
    (``QuantOptions.group_size_for``) that divides the input (None: the tensor stays 8-bit); 8-bit tensors are
    per channel (None)."""

    def group_for(bits: int, in_features: int) -> int | None:
        return choose_group_size(in_features, preferred) if bits == 4 else None

    return group_for


def default_group_size(hidden_size: int) -> int:
    """128 (the usual choice for real models), smaller for tiny models so each row keeps >= 4 groups."""
    for size in INT4_GROUP_SIZES:
        if hidden_size >= 4 * size:
            return size
    return INT4_GROUP_SIZES[-1]


# ---------------------------------------------------------------------------------------------- quantizing


def layer_format(scheme: Scheme, shape: tuple[int, ...], *, role: str, group_size: int) -> tuple[int, bool, int | None]:
    """(bits, symmetric, group size or None for per-channel) of one [out, in] weight under an integer scheme.

    4-bit schemes quantize the decoder's linear layers in groups; the embedding and LM head, and any layer whose
    input size no supported group size divides, stay 8-bit asymmetric per channel (NNCF's default backup mode).
    """
    if scheme.bits == 4 and role == "linear":
        group = choose_group_size(shape[1], group_size)
        if group is not None:
            return 4, scheme.symmetric, group
    if scheme.bits == 4:
        return 8, False, None
    return scheme.bits, scheme.symmetric, None


def quantization_plan(spec: ModelSpec, scheme: Scheme) -> dict[str, tuple[int, bool, int | None]]:
    """``layer_format`` of every canonical matrix of ``spec`` (what an integer artifact stores, for checks)."""
    group_size = scheme.group_size or default_group_size(spec.hidden_size)
    plan = {}
    for name, shape in spec.tensor_shapes().items():
        if len(shape) == 2 and not name.endswith(".router"):  # routers stay float: see WeightFactory.router
            role = "embedding" if name == "embed" else "head" if name == "lm_head" else "linear"
            plan[name] = layer_format(scheme, shape, role=role, group_size=group_size)
    return plan


@dataclass(frozen=True, kw_only=True, slots=True)
class Quantized:
    """One quantized weight: integer codes [out, groups, group] (or [out, in]), f16 scales, zero points."""

    codes: np.ndarray  # uint8 / int8 holding the integer values (4-bit values are packed on export)
    scale: np.ndarray  # float16, [out, 1] or [out, groups, 1]
    zero_point: np.ndarray | None  # uint8 (or float16: a plan's float zero points), as scale; None: symmetric

    def dequantize(self) -> np.ndarray:
        """The float32 weight [out, in] these codes stand for: (codes - zero point) * scale."""
        values = self.codes.astype(np.float32)
        if self.zero_point is not None:
            values = values - self.zero_point.astype(np.float32)
        weight = values * self.scale.astype(np.float32)
        return weight.reshape(weight.shape[0], -1)


QUANTIZE_ROWS = 16384  # rows per block of round-to-nearest quantization (16384 x 4096 float32: 256 MiB)


def quantize(weight: np.ndarray, *, bits: int, symmetric: bool, group_size: int | None) -> Quantized:
    """Round-to-nearest weight quantization along the input axis of a [out, in] weight.

    Asymmetric: per row (or group) scale = (max - min) / (2^bits - 1) with the range widened to include 0,
    zero point = round(-min / scale). Symmetric: scale = -w[argmax |w|] / 2^(bits-1), so the largest-magnitude
    value lands exactly on the extra negative level and no code is wasted.
    """
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise ConversionError(f"cannot quantize a tensor of rank {w.ndim}; expected [out, in]")
    out_features, in_features = w.shape
    if group_size is not None:
        w = w.reshape(out_features, in_features // group_size, group_size)
    if symmetric:
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        index = np.argmax(np.abs(w), axis=-1, keepdims=True)
        extreme = np.take_along_axis(w, index, axis=-1)
        scale = (extreme / np.float32(low)).astype(np.float16)
        scale = np.where(scale == 0, np.float16(np.finfo(np.float16).tiny), scale)
        codes = np.clip(np.rint(w / scale.astype(np.float32)), low, high).astype(np.int8)
        return Quantized(codes=codes, scale=scale, zero_point=None)
    levels = 2**bits - 1
    w_min = np.minimum(w.min(axis=-1, keepdims=True), 0.0)
    w_max = np.maximum(w.max(axis=-1, keepdims=True), 0.0)
    scale = ((w_max - w_min) / np.float32(levels)).astype(np.float16)
    scale = np.where(scale == 0, np.float16(np.finfo(np.float16).tiny), scale)
    scale32 = scale.astype(np.float32)
    zero_point = np.clip(np.rint(-w_min / scale32), 0, levels)
    codes = np.clip(np.rint(w / scale32) + zero_point, 0, levels).astype(np.uint8)
    return Quantized(codes=codes, scale=scale, zero_point=zero_point.astype(np.uint8))


def from_group_codes(codes: GroupCodes) -> Quantized:
    """The plan's codes in this module's layout: [out, groups, group] codes, [out, groups, 1] f16 scales, and
    zero points in u4 (integer) or f16 (float); symmetric codes are shifted to signed i4 without a zero point."""
    scale = codes.scale[..., None].astype(np.float16)
    if codes.symmetric:
        half = 2 ** (codes.bits - 1)
        return Quantized(codes=(codes.codes.astype(np.int16) - half).astype(np.int8), scale=scale, zero_point=None)
    zero = codes.zero[..., None]
    return Quantized(codes=codes.codes, scale=scale,
                     zero_point=zero.astype(np.uint8) if zero.dtype == np.uint8 else zero.astype(np.float16))


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """Pack 4-bit values (uint8 0..15 or int8 -8..7) two per byte, the first in the low nibble."""
    flat = (codes.astype(np.int16) & 0x0F).astype(np.uint8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, dtype=np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


# --------------------------------------------------------------------------------------------- the factory


@dataclass
class WeightStats:
    """What the factory produced, for the artifact metadata."""

    tensors: int = 0
    int4_layers: int = 0
    int8_layers: int = 0
    float_tensors: int = 0
    group_sizes: set[int] = field(default_factory=set)


class WeightFactory:
    """Builds the graph input for each canonical tensor, as a postponed constant plus decompression ops."""

    def __init__(self, model: SourceModel, scheme: Scheme, progress: Callable[[str], None] | None = None,
                 plan: QuantPlan | None = None) -> None:
        self.model = model
        self.scheme = scheme
        self.plan = plan  # 4-bit schemes: the linear layers' recipe (None: round-to-nearest groups)
        self.stats = WeightStats()
        self._progress = progress or (lambda _name: None)
        self._cache: dict[str, Any] = {}
        spec = model.spec
        self.group_size = scheme.group_size or default_group_size(spec.hidden_size)

    # -- reading ---------------------------------------------------------------------------------------
    def _consume(self, name: str, use: Callable[[np.ndarray], _T], read: Callable[[], np.ndarray] | None = None
                 ) -> _T:
        """``use(tensor)`` on canonical tensor ``name`` (float32, or what ``read`` returns), then release its
        checkpoint pages.

        ``use`` must copy what it keeps: the array may be a view of the checkpoint's mapping. Releasing the pages
        (``SourceModel.release_pages``) keeps the writer's resident memory near one tensor instead of letting the
        mapped checkpoint accumulate as ``ov.save_model`` walks the weights.
        """
        self._progress(name)
        try:
            return use(self.model.tensor(name, np.float32) if read is None else read())
        finally:
            self.model.release_pages(name)

    def _planned_codes(self, plan: QuantPlan, name: str) -> GroupCodes:
        """The plan's codes of ``name``: fitted here, or read back when another target of the build fitted
        them with the same recipe (then the weight is not read)."""
        self._progress(name)
        try:
            return plan.codes(name, lambda: self.model.tensor(name, np.float32))
        finally:
            self.model.release_pages(name)

    def _float_tensor(self, name: str, ov_type: Any, shape: tuple[int, ...]) -> Any:
        """An owning ov.Tensor of ``name`` in ``ov_type`` (f32 or f16), filled without extra copies."""
        import openvino as ov

        def fill(array: np.ndarray, *, checked: bool = False) -> Any:
            if ov_type == ov.Type.f16 and not checked:
                check_fits_float16(name, array, where=str(self.model.path), advice=FLOAT16_ADVICE)
            tensor = ov.Tensor(ov_type, ov.Shape(list(shape)))
            parallel_copyto(tensor.data, array.reshape(shape))
            return tensor

        if ov_type != ov.Type.f16 or not self.model.stores_half(name):
            return self._consume(name, fill)
        # Straight from the stored bfloat16/float16 (exact, no float32 copy); only a result holding Inf/NaN is
        # looked at in float32 (NaN/Inf in the checkpoint: SourceError; beyond float16's range: ConversionError).
        tensor = self._consume(name, lambda stored: fill(stored, checked=True), read=lambda: self.model.stored(name))
        return tensor if parallel_all_finite(tensor.data) else self._consume(name, fill)

    def _quantize_by_rows(self, name: str, *, bits: int, symmetric: bool, group_size: int | None) -> Quantized:
        """Round-to-nearest codes of ``name`` computed a block of rows at a time (rows are independent): an
        8B model's embedding or head (525M weights) needs ~0.3 GB of float32 at a time instead of ~6 GB."""
        self._progress(name)
        rows = self.model.spec.tensor_shapes()[name][0]
        parts: list[Quantized] = []
        try:
            for start in range(0, rows, QUANTIZE_ROWS):
                block = self.model.rows(name, slice(start, start + QUANTIZE_ROWS))
                parts.append(quantize(block, bits=bits, symmetric=symmetric, group_size=group_size))
                del block
        finally:
            self.model.release_pages(name)
        zero = None if parts[0].zero_point is None else np.concatenate([q.zero_point for q in parts
                                                                           if q.zero_point is not None])
        return Quantized(codes=np.concatenate([q.codes for q in parts]),
                         scale=np.concatenate([q.scale for q in parts]), zero_point=zero)

    # -- graph pieces ----------------------------------------------------------------------------------
    def vector(self, name: str) -> Any:
        """Norm weights and biases: small, kept in float (f16 + Convert for fp16, else f32)."""
        dtype = np.float16 if self.scheme.float_dtype == np.float16 and self.scheme.kind == "float" else np.float32
        return self._float(name, dtype)

    def router(self, name: str) -> Any:
        """A mixture-of-experts router [experts, hidden], kept float (f16 + Convert for fp16, else f32).

        NOTE: routing is a discrete top-k choice, so quantization noise in the router moves tokens between experts
        at near-ties; the router is tiny (experts x hidden), so integer precisions keep it float, like the norms.
        """
        return self.vector(name)

    def input_multiplier(self, name: str) -> np.ndarray | None:
        """What linear ``name``'s input is multiplied by before its matmul (the plan's activation-aware
        scaling of a 4-bit tensor), or None."""
        planned = self.plan.tensors.get(name) if self.plan is not None else None
        if planned is None or planned.bits != 4 or self.scheme.kind == "float":
            return None
        return self.plan.input_multiplier(name) if self.plan is not None else None

    def matrix(self, name: str, *, role: str = "linear") -> Any:
        """A [out, in] weight as an f32 graph output; ``role`` is "linear", "embedding" or "head"."""
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        scheme = self.scheme
        if scheme.kind == "float":
            node = self._float(name, scheme.float_dtype)
        else:
            shape = self.model.spec.tensor_shapes()[name]
            plan = self.plan
            planned = plan.tensors.get(name) if plan is not None and role == "linear" else None
            if plan is not None and planned is not None and planned.bits == 4:
                node = self._quantized(name, shape, bits=4, symmetric=plan.options.symmetric,
                                       group_size=planned.group_size, planned=True)
            elif planned is not None:  # kept 8-bit by the plan: per channel, asymmetric (as the embedding)
                node = self._quantized(name, shape, bits=8, symmetric=False, group_size=None)
            else:
                bits, symmetric, group = layer_format(scheme, shape, role=role, group_size=self.group_size)
                node = self._quantized(name, shape, bits=bits, symmetric=symmetric, group_size=group)
        self._cache[name] = node
        return node

    def _float(self, name: str, dtype: Any) -> Any:
        import openvino as ov
        import openvino.opset13 as ops
        from openvino.utils import make_postponed_constant

        shape = self.model.spec.tensor_shapes()[name]
        ov_type = ov.Type.f16 if dtype == np.float16 else ov.Type.f32

        def maker() -> Any:
            return self._float_tensor(name, ov_type, shape)

        const = make_postponed_constant(ov_type, ov.Shape(list(shape)), maker, name=name)
        self.stats.tensors += 1
        self.stats.float_tensors += 1
        if ov_type == ov.Type.f16:
            return ops.convert(const.output(0), ov.Type.f32, name=f"{name}/decompress").output(0)
        return const.output(0)

    def _quantized(self, name: str, shape: tuple[int, ...], *, bits: int, symmetric: bool, group_size: int | None,
                   planned: bool = False) -> Any:
        import openvino as ov
        import openvino.opset13 as ops
        from openvino.utils import make_postponed_constant

        out_features, in_features = shape
        if group_size is not None:
            code_shape = [out_features, in_features // group_size, group_size]
            param_shape = [out_features, in_features // group_size, 1]
        else:
            code_shape = [out_features, in_features]
            param_shape = [out_features, 1]
        code_type = {(8, False): ov.Type.u8, (8, True): ov.Type.i8, (4, False): ov.Type.u4, (4, True): ov.Type.i4}[
            (bits, symmetric)
        ]
        plan = self.plan if planned else None
        if plan is not None:
            lazy = _LazyQuantized(lambda: from_group_codes(self._planned_codes(plan, name)))
        else:
            lazy = _LazyQuantized(lambda: self._quantize_by_rows(name, bits=bits, symmetric=symmetric,
                                                                 group_size=group_size))
        float_zero = plan is not None and not plan.integer_zero and not symmetric

        def codes_maker() -> Any:
            codes = lazy.take_codes()
            if bits == 4:
                return _packed_tensor(codes, code_type, code_shape)
            return _tensor(codes.reshape(code_shape))

        def scale_maker() -> Any:
            return _tensor(lazy.params().scale.reshape(param_shape))

        def zero_maker() -> Any:  # made for asymmetric formats only, which always have zero points
            zero = lazy.params().zero_point
            if zero is None:
                raise ConversionError(f"internal error: {name!r} was quantized without zero points")
            if float_zero:
                return _tensor(zero.astype(np.float16).reshape(param_shape))
            if bits == 4:
                return _packed_tensor(zero, code_type, param_shape)
            return _tensor(zero.reshape(param_shape))

        codes = make_postponed_constant(code_type, ov.Shape(code_shape), codes_maker, name=name)
        values = ops.convert(codes.output(0), ov.Type.f16, name=f"{name}/codes_f16")
        if float_zero:  # f16 zero points subtracted as they are (the CPU plugin keeps the pattern: module NOTE)
            zero = make_postponed_constant(ov.Type.f16, ov.Shape(param_shape), zero_maker, name=f"{name}/zero_point")
            values = ops.subtract(values, zero.output(0), name=f"{name}/zero_point/subtract")
        elif not symmetric:
            zero = make_postponed_constant(code_type, ov.Shape(param_shape), zero_maker, name=f"{name}/zero_point")
            zero_f16 = ops.convert(zero.output(0), ov.Type.f16, name=f"{name}/zero_point_f16")
            values = ops.subtract(values, zero_f16, name=f"{name}/zero_point/subtract")
        scale = make_postponed_constant(ov.Type.f16, ov.Shape(param_shape), scale_maker, name=f"{name}/scale")
        weight = ops.multiply(values, scale.output(0), name=f"{name}/dequantize")
        if group_size is not None:
            target = ops.constant(np.array(shape, dtype=np.int64), name=f"{name}/ungroup_shape")
            weight = ops.reshape(weight, target, special_zero=False, name=f"{name}/ungroup")
        self.stats.tensors += 1
        if bits == 4:
            self.stats.int4_layers += 1
            if group_size is not None:
                self.stats.group_sizes.add(group_size)
        else:
            self.stats.int8_layers += 1
        return ops.convert(weight, ov.Type.f32, name=f"{name}/decompress").output(0)


def _tensor(array: np.ndarray) -> Any:
    """An ov.Tensor owning a copy of ``array``.

    NOTE: never ``ov.Tensor(array, shared_memory=True)`` here: the tensor outlives this call inside the
    serializer, and a shared tensor does not keep the numpy buffer alive (it was freed and reused: garbage
    weights in the IR). Makers allocate an owning tensor and copy into it.
    """
    import openvino as ov

    tensor = ov.Tensor(ov.Type(array.dtype), ov.Shape(list(array.shape)))
    np.copyto(tensor.data, array)
    return tensor


def _packed_tensor(values: np.ndarray, ov_type: Any, shape: list[int]) -> Any:
    """An owning u4/i4 tensor of ``shape`` holding ``values`` (packed two per byte, low nibble first)."""
    import openvino as ov

    tensor = ov.Tensor(ov_type, ov.Shape(shape))
    tensor.data[:] = pack_int4(values)
    return tensor


class _LazyQuantized:
    """Quantizes one weight on first use; hands its large codes out once and keeps the small scales.

    ``ov.save_model`` asks for the codes, scales and zero points of one weight as three constants, in an order
    it chooses; quantizing once and dropping the codes after they are written keeps one weight in memory.
    """

    def __init__(self, compute: Callable[[], Quantized]) -> None:
        self._compute = compute
        self._codes: np.ndarray | None = None
        self._params: Quantized | None = None

    def _run(self) -> Quantized:
        result = self._compute()
        self._codes = result.codes
        self._params = Quantized(codes=np.zeros(0, dtype=np.uint8), scale=result.scale,
                                 zero_point=result.zero_point)
        return self._params

    def take_codes(self) -> np.ndarray:
        if self._codes is None:
            self._run()
        codes, self._codes = self._codes, None
        if codes is None:  # _run always sets them; typed for mypy
            raise ConversionError("internal error: quantized codes missing")
        return codes

    def params(self) -> Quantized:
        return self._params if self._params is not None else self._run()


def _counter(progress: Progress, label: str, total: int) -> Callable[[str], None]:
    """A per-tensor callback reporting ``label`` as done/total (reported at 0 now)."""
    done = 0

    def on_tensor(_name: str) -> None:
        nonlocal done
        done += 1
        progress(label, min(done, total), total)

    progress(label, 0, total)
    return on_tensor


def counted_weights(model: SourceModel, precision: str, progress: Progress, plan: QuantPlan | None = None
                    ) -> tuple[WeightFactory, Callable[[], None]]:
    """A WeightFactory for ``precision`` (and 4-bit ``plan``) that reports each tensor it writes as
    ``openvino:<precision>: weights``, and the call that reports the step complete (once the IR is saved)."""
    label = f"openvino:{precision}: weights"
    total = len(model.tensor_map)
    on_tensor = _counter(progress, label, total)
    return WeightFactory(model, SCHEMES[precision], on_tensor, plan), lambda: progress(label, total, total)
