"""llama.cpp's own K-quant mixes (q4_k_m / q5_k_m / q6_k), made by ``llama_model_quantize``.

The gguf writer first writes an f32 (or, for an all-f16 checkpoint, f16) intermediate GGUF; llama.cpp's
quantizer picks each tensor's type from that (its recipe, not ours), and the intermediate is deleted.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from sovpack.errors import ConversionError
from sovpack.targets.gguf.runtime import N_THREADS, import_llama_cpp, quiet_llama

# precision -> llama.cpp's file type constant
LLAMA_QUANTS = {
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}


def llama_quantize(src: Path, dst: Path, precision: str, *, threads: int = N_THREADS) -> None:
    """Quantize a GGUF with llama.cpp's own quantizer (k-quant mixes), into ``dst`` via a temporary sibling."""
    llama_cpp = import_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_QUANTS[precision])
    params.nthread = threads
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        with quiet_llama():
            llama_cpp.llama_backend_init()
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise ConversionError(
                f"llama.cpp could not quantize {src.name} to {precision} (llama_model_quantize returned {rc})"
            )
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(OSError):  # cleanup only: gone after the rename, or never written
            tmp.unlink()
