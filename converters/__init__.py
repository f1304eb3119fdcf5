"""Model families: one module each, mapping a Hugging Face config and tensor names to the canonical spec.

Adding a family is one module here and one import line below.
"""

from sovpack.converters import gemma, llama, phi3, qwen
from sovpack.converters.base import FAMILIES, DecoderFamily, Family, TensorSource, family_for_config

__all__ = ["FAMILIES", "DecoderFamily", "Family", "TensorSource", "family_for_config", "gemma", "llama", "phi3", "qwen"]
