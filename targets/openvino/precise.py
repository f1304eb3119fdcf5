"""Marks written into a saved IR's XML that Python cannot set on a node: ``precise`` compute nodes (kept in f32
where a device would lower the precision) and ``decompression`` Converts of f16 weights.

The mark is the IR attribute behind ``ov::disable_fp16_compression``; the CPU plugin honours it when it runs a
model in bf16 or f16 (its default on AMX / AVX512-BF16 CPUs, where ``INFERENCE_PRECISION_HINT`` is bf16 unless a
caller passes f32; OpenVINO reads that property from no model). Used by the encoder writer (``encoder_writer``)
and the decoder writer (``target``).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from sovpack.errors import ConversionError

__all__ = ["mark_fp16_decompression", "mark_precise"]

# Name suffixes of the weight-decompression nodes ``weights`` makes: left unmarked, so the CPU plugin still fuses
# them into its compressed-weight kernels.
_DECOMPRESSION = ("/decompress", "/codes_f16", "/zero_point_f16", "/zero_point/subtract", "/dequantize", "/ungroup")
_UNMARKED_TYPES = frozenset({"Const", "Parameter", "Result"})


def mark_precise(xml_path: Path, blocks: tuple[str, ...] | None = None) -> int:
    """Mark every compute layer of a saved IR ``precise`` (kept in f32 when a device lowers precision), or only
    those of the named ``blocks`` (``rope`` marks ``rope/...``); returns how many. Constants, parameters, results
    and weight decompression stay unmarked.

    NOTE: an XML edit, as ``mark_fp16_decompression``: Python can only attach string rt_info to a node,
    which the serializer does not write as this attribute.
    """
    tree = ET.parse(xml_path)
    layers = tree.getroot().find("layers")
    if layers is None:
        raise ConversionError(f"{xml_path}: not an OpenVINO IR (no layers)")
    marked = 0
    for layer in layers.findall("layer"):
        name = layer.get("name") or ""
        if layer.get("type") in _UNMARKED_TYPES or name.endswith(_DECOMPRESSION):
            continue
        if blocks is not None and not name.startswith(tuple(f"{block}/" for block in blocks)):
            continue
        marked += _add_attribute(layer, "precise", 0)
    _save(tree, xml_path)
    return marked


def mark_fp16_decompression(xml_path: Path) -> int:
    """Mark every ``Const f16 -> Convert f32`` in a saved IR as weight decompression; returns how many.

    This is the rt_info ``ov.save_model(compress_to_fp16=True)`` writes on the Converts it inserts; without
    it the CPU plugin folds the Converts at compile time and holds the weights as f32. Python cannot set the
    attribute on a node (only string rt_info, which the serializer does not write), hence this edit.
    """
    tree = ET.parse(xml_path)
    root = tree.getroot()
    layers = root.find("layers")
    edges = root.find("edges")
    if layers is None or edges is None:
        raise ConversionError(f"{xml_path}: not an OpenVINO IR (no layers/edges)")
    f16_consts = set()
    for layer in layers.findall("layer"):
        data = layer.find("data")
        if layer.get("type") == "Const" and data is not None and data.get("element_type") == "f16":
            f16_consts.add(layer.get("id"))
    sources = {edge.get("to-layer"): edge.get("from-layer") for edge in edges.findall("edge")}
    marked = 0
    for layer in layers.findall("layer"):
        data = layer.find("data")
        if layer.get("type") != "Convert" or data is None or data.get("destination_type") != "f32":
            continue
        if sources.get(layer.get("id")) not in f16_consts:
            continue
        marked += _add_attribute(layer, "decompression", list(layer).index(data) + 1)
    _save(tree, xml_path)
    return marked


def _add_attribute(layer: ET.Element, name: str, position: int) -> bool:
    """Add rt_info attribute ``name`` to an IR layer (its rt_info created at ``position``); False if present."""
    rt_info = layer.find("rt_info")
    if rt_info is None:
        rt_info = ET.Element("rt_info")
        layer.insert(position, rt_info)
    if any(a.get("name") == name for a in rt_info.findall("attribute")):
        return False
    ET.SubElement(rt_info, "attribute", {"name": name, "version": "0"})
    return True


def _save(tree: Any, xml_path: Path) -> None:
    ET.indent(tree, space="\t")
    tree.write(xml_path, encoding="utf-8", xml_declaration=True)
