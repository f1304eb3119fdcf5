"""Model families: one module each, mapping a Hugging Face config and tensor names to the canonical spec.

Adding a family is one module here: it declares a class with ``@register_family`` and a ``name``, and
``load_families`` finds it.
"""

from sovpack.converters.base import FAMILIES, DecoderFamily, family_for_config, load_families, register_family

__all__ = ["FAMILIES", "DecoderFamily", "family_for_config", "load_families", "register_family"]
