"""int8/int4 weights: one projection at a time through onnxruntime's own MatMulNBitsQuantizer.

# NOTE: int8/int4. Weight-only, round-to-nearest, block-wise (block 32, asymmetric with uint8 zero points),
# done by onnxruntime's own ``MatMulNBitsQuantizer`` (bits=4 or bits=8) and run as ``MatMulNBits``. To keep
# it streaming we never build the full fp32 graph in memory: each linear weight is quantized on its own, as
# the only MatMul of a one-node model that MatMulNBitsQuantizer processes, and the node and packed
# initializers it emits are moved into the real graph. Peak memory is therefore a few times the largest
# single weight (its fp32 copy, the transposed copy inside the one-node model, the packed output), not the
# model. What is not streaming: nothing model-wide, but each individual matrix is quantized whole (the ORT
# kernel takes one contiguous [K, N] fp32 array), so an 8k x 28k MLP matrix needs ~3 x 0.9 GB transiently.
# The embedding table and the lm_head are not quantized: both stay fp16 (as in GPTQ/AWQ checkpoints, and
# close to llama.cpp keeping its output tensor at 6-8 bits). The head is the most quantization-sensitive
# matrix (its error lands on the logits unfiltered; 4-bit there raises the fixtures' KL by ~20%), fp16 costs
# no extra copy when the head is tied (the Gemm reads the fp16 embedding table with transB), and an 8-bit
# MatMulNBits head would lift int4's minimum onnxruntime from 1.17 to 1.23.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from sovpack.errors import ConversionError

QUANT_BLOCK_SIZE = 32


def quantize_matmul_weight(
    weight_t: Callable[[], np.ndarray], bits: int, block_size: int, opset: int
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Quantize one [K, N] float32 weight with onnxruntime's MatMulNBitsQuantizer.

    ``weight_t`` produces the weight (so no caller keeps a reference while the quantizer runs). The weight is
    the only initializer of a one-MatMul model (default-domain ``opset``); the quantizer rewrites that MatMul
    into MatMulNBits. Returns the node's attributes and its weight inputs in order (packed B, scales[, zero
    points]).
    """
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    array = weight_t()
    k, n = array.shape
    init = numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), "W")
    del array
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"], name="linear")],
        "one_linear",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        initializer=[init],
    )
    del init
    one = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    one.ir_version = helper.find_min_ir_version_for(list(one.opset_import), ignore_unknown=True)
    del graph
    quant_logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quant_logger.level
    quant_logger.setLevel(logging.WARNING)
    try:
        quantizer = MatMulNBitsQuantizer(one, bits=bits, block_size=block_size, is_symmetric=False)
        del one
        quantizer.process()
    finally:
        quant_logger.setLevel(level)
    result = quantizer.model.model
    nodes = [nd for nd in result.graph.node if nd.op_type == "MatMulNBits"]
    if len(nodes) != 1 or len(result.graph.node) != 1:
        raise ConversionError(
            f"MatMulNBitsQuantizer produced {[nd.op_type for nd in result.graph.node]}, expected one MatMulNBits"
        )
    node = nodes[0]
    inits = {t.name: t for t in result.graph.initializer}
    arrays = [numpy_helper.to_array(inits[name]) for name in node.input[1:] if name]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return attrs, arrays
