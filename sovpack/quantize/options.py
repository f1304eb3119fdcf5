"""What a user may ask of a 4-bit quantizer, recorded verbatim in the artifact metadata and provenance."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sovpack.errors import UsageError

# "auto": the best method the model's size allows (gptq when its calibration Hessians fit in memory, else
# "weighted"); "rtn": plain min/max round-to-nearest; "weighted": each group's range searched to minimise the
# error weighted by the calibration activations' energy per input channel (what llama.cpp does with an
# importance matrix); "gptq": weighted ranges plus GPTQ's column-by-column error compensation; "awq": each
# tensor's input channels scaled by their measured activation size first (searched per tensor), then GPTQ
# (weighted ranges when Hessians do not fit).
METHODS = ("auto", "rtn", "weighted", "gptq", "awq")
DEFAULT_INT8_SHARE = 0.125

# NOTE: the default 4-bit group of the planned targets (onnx:int4, openvino:int4; GGUF's K-quants have GGML's
# fixed blocks): 32 below LARGE_MODEL_PARAMETERS, 128 from there (7-9B-class models). Groups of 32 cost the
# least quality (targets/openvino/weights.py's NOTE: mean KL 0.039 against 0.062 at 128 on the realistic llama3
# fixture), but OpenVINO's CPU plugin holds every group's scale and zero point as float32: at 8B and groups of
# 32 its parity run peaked at 9.4 GiB of anonymous memory against 6.7 GiB at 128 (benchmarks/release_size.py,
# README), the one phase of an 8B int4 build above 8 GB. 128 is NNCF's and optimum-intel's default and the
# usual GPTQ/AWQ choice; what it costs a real 7-9B model is not measured here (no such weights on this
# machine), and parity still judges every artifact. Both targets take the same default so a build of both
# fits each tensor once (sovpack.quantize.cache). ``--group-size`` overrides it at every size.
SMALL_MODEL_GROUP_SIZE = 32
LARGE_MODEL_GROUP_SIZE = 128
LARGE_MODEL_PARAMETERS = 6_000_000_000


def default_group_size(parameters: int) -> int:
    """The preferred 4-bit group of a model with ``parameters`` weights (see the NOTE above)."""
    return LARGE_MODEL_GROUP_SIZE if parameters >= LARGE_MODEL_PARAMETERS else SMALL_MODEL_GROUP_SIZE


@dataclass(frozen=True, kw_only=True, slots=True)
class QuantOptions:
    """Options of a 4-bit conversion; the defaults are what ``-t FORMAT:int4`` uses."""

    method: str = "auto"
    group_size: int | None = None  # None: the default for the model's size (default_group_size)
    symmetric: bool = False
    calibration: Path | None = None  # a UTF-8 text file; None: the built-in corpus (sovpack.quantize.corpus)
    # Share of the decoder's linear-layer parameters kept at 8 bits, the most sensitive tensors first.
    int8_share: float = DEFAULT_INT8_SHARE

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"unknown quantization method {self.method!r}; known: {', '.join(METHODS)}")
        if self.group_size is not None and (self.group_size < 8 or self.group_size & (self.group_size - 1)):
            raise UsageError(f"group size must be a power of two >= 8, got {self.group_size}")
        if not 0.0 <= self.int8_share <= 1.0:
            raise UsageError(f"the 8-bit share must be within 0..1, got {self.int8_share}")

    def group_size_for(self, parameters: int) -> int:
        """The preferred 4-bit group: the one asked for, else the default for a model of ``parameters``."""
        return self.group_size if self.group_size is not None else default_group_size(parameters)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["calibration"] = self.calibration.name if self.calibration is not None else "built-in"
        return data
