"""Weight quantization shared by the targets: calibration through the numpy reference, group-wise integer
codes (round-to-nearest, importance-weighted range search, GPTQ-style error compensation), and the choice of
which tensors stay 8-bit.

Targets own the byte layout of their formats (MatMulNBits blobs, OpenVINO u4 constants, llama.cpp's
quantizer); this package decides the integer codes, scales and zero points, from measurements.
"""

from importlib import import_module
from typing import Any

from sovpack.quantize.options import DEFAULT_INT8_SHARE, METHODS, QuantOptions, default_group_size

# The rest loads on first use: the CLI reads the options at start-up without importing the reference.
_LAZY = {
    "Calibration": "calibration", "InputStats": "calibration", "calibrate": "calibration",
    "GroupCodes": "groups", "fit_groups": "groups", "quantize_rtn": "groups", "gptq_quantize": "gptq",
    "QuantPlan": "plan", "plan_quantization": "plan",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"sovpack.quantize.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'sovpack.quantize' has no attribute {name!r}")


__all__ = [
    "DEFAULT_INT8_SHARE",
    "METHODS",
    "Calibration",
    "GroupCodes",
    "InputStats",
    "QuantOptions",
    "QuantPlan",
    "calibrate",
    "default_group_size",
    "fit_groups",
    "gptq_quantize",
    "plan_quantization",
    "quantize_rtn",
]
