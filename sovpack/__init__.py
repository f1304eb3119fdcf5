"""sovpack: turn an open-weight checkpoint into signed, parity-checked artifacts for every runtime.

The library API is the source of truth; the ``sovpack`` CLI is a thin shell over it:

- ``sovpack.source.model.open_model``: read and validate a Hugging Face-style checkpoint into a canonical spec.
- ``sovpack.reference.ReferenceModel``: the numpy fp32 forward pass every artifact is checked against.
- ``sovpack.convert.convert``: write one target artifact (ONNX, GGUF, OpenVINO) and check its parity.
"""

__version__ = "0.1.0"
