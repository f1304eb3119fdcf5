"""A source model: a checkpoint, its canonical spec and lazy access to canonical tensors.

This is what every stage after reading takes: targets, the reference and parity never see HF names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from sovpack._io import parallel_all_finite, parallel_copyto
from sovpack._protocols import Family, TensorSource
from sovpack.converters import family_for_config
from sovpack.converters.base import check_generation_config, stored_layout
from sovpack.errors import ConversionError, SourceError
from sovpack.source.checkpoint import Checkpoint
from sovpack.source.fused import check_source, read_mxfp4, read_source, source_shards
from sovpack.source.sentence_transformers import read_pooling
from sovpack.source.spec import ModelSpec


@dataclass
class SourceModel:
    """A checkpoint opened and validated against its family's spec."""

    checkpoint: Checkpoint
    family: Family
    spec: ModelSpec
    tensor_map: dict[str, TensorSource]
    allow_nonfinite: bool = False
    # Measurements derived from the weights that every target converted from this opened model shares (one
    # build: calibration statistics, quantization sensitivities), keyed by their producer; not compared.
    derived: dict[object, object] = field(default_factory=dict, repr=False, compare=False)
    # A private directory where a build's targets share large derived data (4-bit codes, sovpack.quantize.cache);
    # None: nothing is shared on disk.
    scratch: Path | None = field(default=None, repr=False, compare=False)

    @property
    def path(self) -> Path:
        return self.checkpoint.root

    @property
    def name(self) -> str:
        return self.checkpoint.root.resolve().name

    def tensor_names(self) -> list[str]:
        return list(self.tensor_map)

    def stored(self, name: str) -> np.ndarray:
        """A canonical tensor in its stored dtype, without copying when it can (no norm offset applied).

        One expert of a fused tensor is a view of that expert only (maybe transposed or strided); MXFP4 experts
        come dequantized to float32 (exact), one expert at a time.
        """
        return read_source(self.checkpoint, self.tensor_map[name])

    def stored_mxfp4(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """An MXFP4 canonical tensor as stored: blocks [out, in/32, 16] and E8M0 scales [out, in/32] (uint8
        views, low nibble first), for a writer that keeps MXFP4 as it is; None when the tensor is not MXFP4.
        ``tensor`` gives the same values dequantized (and refuses scale 255); these are passed through unchecked."""
        return read_mxfp4(self.checkpoint, self.tensor_map[name])

    def stores_half(self, name: str) -> bool:
        """Whether canonical tensor ``name`` is stored as bfloat16 or float16 with no family offset: a float16
        writer may then convert ``stored(name)`` directly (every bfloat16 value converts to float16 exactly as
        through float32; checked over all 65536), skipping the float32 copy ``tensor`` makes."""
        source = self.tensor_map[name]
        info = self.checkpoint.tensors.get(source.name)
        return not source.add and source.mxfp4_scales is None and info is not None and info.dtype in ("BF16", "F16")

    def release_all_pages(self) -> None:
        """Let go of every mapped page of the checkpoint (after a pass over all weights, e.g. the reference)."""
        for shard in self.checkpoint.shards.values():
            shard.release_pages()

    def release_pages(self, name: str) -> None:
        """Let go of the mapped pages behind a canonical tensor once a streaming writer is done with it."""
        for shard in source_shards(self.checkpoint, self.tensor_map[name]):
            self.checkpoint.shards[shard].release_pages()

    def tensor(self, name: str, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """A canonical tensor as ``dtype`` (float32 by default) with family adjustments applied.

        Raises SourceError on NaN/Inf unless the model was opened with ``allow_nonfinite``.
        """
        source = self.tensor_map[name]
        array = self.stored(name).astype(np.float32) if source.add else self.stored(name)
        if source.add:
            array = array + np.float32(source.add)
        # NOTE: contiguous, so a transposed or strided expert view reaches writers in plain row-major order; the
        # cast on every core (a value the dtype cannot hold becomes Inf: reported by _check_finite)
        out = array
        if array.dtype != dtype or not array.flags.c_contiguous:
            out = np.empty(array.shape, dtype=dtype)
            parallel_copyto(out, array)
        self._check_finite(name, out, source=array)
        return out

    def rows(self, name: str, index: np.ndarray | slice) -> np.ndarray:
        """Rows ``index`` of a canonical 2-D tensor as float32 (family adjustments applied): an embedding
        lookup without converting the whole table."""
        source = self.tensor_map[name]
        out = np.ascontiguousarray(self.stored(name)[index], dtype=np.float32)
        if source.add:
            out = out + np.float32(source.add)
        self._check_finite(name, out, memo=False)
        return out

    def _check_finite(self, name: str, array: np.ndarray, *, memo: bool = True, source: np.ndarray | None = None
                      ) -> None:
        """SourceError on NaN/Inf (unless allowed); with ``memo`` a whole tensor is checked once per dtype per
        opened model (the numpy reference of a large model reads every weight again at each step). ``source``:
        what ``array`` was cast from; finite there, a non-finite ``array`` is a ConversionError (out of range)."""
        if self.allow_nonfinite or not np.issubdtype(array.dtype, np.floating):
            return
        key = ("finite", name, array.dtype.str)
        if memo and key in self.derived:
            return
        if not parallel_all_finite(array):
            stored = self.tensor_map[name]
            where = self.checkpoint.shard_of(stored.name)
            part = "" if stored.expert is None else f" (expert {stored.expert})"
            if source is not None and source.dtype != array.dtype and np.isfinite(source.astype(np.float32)).all():
                raise ConversionError(
                    f"{self.checkpoint.root / where}: tensor {stored.name!r}{part} has values beyond {array.dtype}'s "
                    f"range (largest {float(np.finfo(array.dtype).max):g})"
                )
            raise SourceError(
                f"{self.checkpoint.root / where}: tensor {stored.name!r}{part} contains NaN or Inf values "
                "(pass --allow-nonfinite to convert it anyway)"
            )
        if memo:
            self.derived[key] = True

    def validate(self) -> None:
        """Every canonical tensor exists with the shape the config implies; errors name file and tensor."""
        shapes = self.spec.tensor_shapes()
        config_path = self.checkpoint.root / "config.json"
        for name, source in self.tensor_map.items():
            check_source(self.checkpoint, source, shapes[name], config_path, self.spec.family)


# A stack's layer tensors: "<prefix>layers.<i>.<rest>" (BERT-style encoders: "<prefix>layer.<i>."; digits
# capped: an index is never 10 digits long). The prefix tells stacks apart: a vision-language checkpoint stores its
# vision tower's layers beside the decoder's.
_LAYER_INDEX = re.compile(r"^(|.*\.)layers?\.(\d{1,9})\.")


def check_layer_count(spec: ModelSpec, checkpoint: Checkpoint, where: str) -> None:
    """The config's layer count matches the layers the checkpoint stores, before anything is built per layer.

    The config is a few bytes and can claim a billion layers; the tensor map and every check after it grow with
    the layer count, so it must first be held against what is actually stored (bounded by the header size).
    One stack of layers (tensors sharing the prefix before ``layers.<i>.``) must have exactly that many.
    """
    stacks: dict[str, set[int]] = {}
    for name in checkpoint.tensors:
        if m := _LAYER_INDEX.match(name):
            stacks.setdefault(m.group(1), set()).add(int(m.group(2)))
    if any(len(indices) == spec.num_layers for indices in stacks.values()):
        return
    stored = max(stacks.values(), key=len, default=set())
    held = f"{len(stored)} layers" if stored else "no layers"
    span = f" (indices {min(stored)} to {max(stored)})" if stored else ""
    raise SourceError(f"{where}: 'num_hidden_layers' is {spec.num_layers} but the checkpoint stores {held}{span}")


def open_model(path: str | Path, *, allow_nonfinite: bool = False) -> SourceModel:
    """Open a checkpoint directory, pick its family, build the spec and check every tensor's shape.

    Cheap checks come first: config types and ranges (ConfigReader), then the layer count against the stored
    tensor names, and only then the per-layer tensor map and the shapes of every stored tensor.
    """
    checkpoint = Checkpoint(Path(path))
    where = str(checkpoint.root / "config.json")
    family = family_for_config(checkpoint.config, where)
    spec = family.build_spec(checkpoint.config, where)
    if spec.encoder is not None:  # an embedding encoder: its pooling is declared beside config.json
        spec = replace(spec, encoder=replace(spec.encoder, pooling=read_pooling(checkpoint.root)))
    if checkpoint.generation_config is not None:
        check_generation_config(
            checkpoint.generation_config, spec.vocab_size, str(checkpoint.root / "generation_config.json")
        )
    check_layer_count(spec, checkpoint, where)
    model = SourceModel(
        checkpoint=checkpoint,
        family=family,
        spec=spec,
        tensor_map=stored_layout(family.tensor_map(spec), checkpoint.tensors),
        allow_nonfinite=allow_nonfinite,
    )
    model.validate()
    return model
