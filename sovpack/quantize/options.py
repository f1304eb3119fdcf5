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


@dataclass(frozen=True, kw_only=True, slots=True)
class QuantOptions:
    """Options of a 4-bit conversion; the defaults are what ``-t FORMAT:int4`` uses."""

    method: str = "auto"
    group_size: int | None = None  # None: the target's default for the model's width
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

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["calibration"] = self.calibration.name if self.calibration is not None else "built-in"
        return data
