"""onnxruntime's MatMulNBits with the zero-point layouts an int4 artifact could use, on one 8B-sized matrix.

The plan fits float zero points (sovpack.quantize). MatMulNBits accepts them, but its CPU kernel then takes a
slow path; the artifact stores uint8 zero points plus a per-block residual matmul instead (see
targets/onnx/quantize.py, ``split_float_zero_points``). This times all three on a 14336 x 4096 weight (an
8B Llama MLP matrix) for one token (decode) and 16 tokens (a short prefill) and checks that the residual form
computes the float-zero-point weights.

Usage: python benchmarks/onnx_int4_kernel.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import print_table  # noqa: E402

N, K, BLOCK = 14336, 4096, 32


def _session(nodes: list, inits: list) -> object:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "one_linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])], initializer=inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from sovpack.quantize.groups import fit_groups
    from sovpack.targets.onnx.quantize import pack_matmulnbits, split_float_zero_points

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((N, K)) * 0.02).astype(np.float32)
    codes = fit_groups(weight, bits=4, group_size=BLOCK, symmetric=False, scale_dtype=np.float32, integer_zero=False)
    integer, residual = split_float_zero_points(codes)
    assert residual is not None
    layouts = {}
    attrs, arrays = pack_matmulnbits(codes)  # float zero points as MatMulNBits takes them
    inits = [numpy_helper.from_array(a, n) for a, n in zip(arrays, ("b", "scales", "zp"), strict=True)]
    node = helper.make_node("MatMulNBits", ["x", "b", "scales", "zp"], ["y"], domain="com.microsoft", **attrs)
    layouts["float zero points"] = _session([node], inits)
    attrs, arrays = pack_matmulnbits(integer)
    inits = [numpy_helper.from_array(a, n) for a, n in zip(arrays, ("b", "scales", "zp"), strict=True)]
    node = helper.make_node("MatMulNBits", ["x", "b", "scales", "zp"], ["y"], domain="com.microsoft", **attrs)
    layouts["uint8 zero points (rounded: not the same weights)"] = _session([node], inits)
    nodes = [
        helper.make_node("MatMulNBits", ["x", "b", "scales", "zp"], ["y0"], domain="com.microsoft", **attrs),
        helper.make_node("Reshape", ["x", "blocks_shape"], ["blocks"]),
        helper.make_node("ReduceSum", ["blocks", "last"], ["sums"], keepdims=0),
        helper.make_node("MatMul", ["sums", "residual"], ["offset"]),
        helper.make_node("Sub", ["y0", "offset"], ["y"]),
    ]
    extra = [numpy_helper.from_array(np.array([-1, K // BLOCK, BLOCK], np.int64), "blocks_shape"),
             numpy_helper.from_array(np.array([-1], np.int64), "last"), numpy_helper.from_array(residual, "residual")]
    layouts["uint8 + residual (sovpack's artifact)"] = _session(nodes, inits + extra)

    expected = codes.dequantize()
    rows = []
    for label, session in layouts.items():
        cells = [label]
        for m in (1, 16):
            x = rng.standard_normal((m, K)).astype(np.float32)
            y = session.run(None, {"x": x})[0]  # type: ignore[attr-defined]
            start = time.perf_counter()
            for _ in range(args.repeat):
                session.run(None, {"x": x})  # type: ignore[attr-defined]
            cells.append(f"{(time.perf_counter() - start) / args.repeat * 1e3:.2f}")
            error = float(np.abs(y - x @ expected.T).max() / np.abs(x @ expected.T).max())
        cells.append(f"{error:.1e}")
        rows.append(cells)
    print(f"onnxruntime {ort.__version__}, 2 threads, weight {N} x {K}, blocks of {BLOCK}")
    print_table(["layout", "1 token ms", "16 tokens ms", "rel. error vs the plan's weights"], rows)


if __name__ == "__main__":
    main()
