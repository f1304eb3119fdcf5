"""The first target's artifact opened on its runtime while the other writers of a build finish.

A runtime's load is mostly one core's work (onnxruntime widens and prepacks every float16 weight: ~4 s at
0.6B), and the writers of a build end one after another, the last ones waiting on the disk. Opening the first
target to be judged as soon as its own artifact is complete puts that load on the idle core, so its parity
run starts with the runtime ready. It is done only where the runtime's parity memory fits beside the writers.
Where that load outlasts the writers, the build judges another written target meanwhile (``loading`` and
``fits_beside``), so the core the single-threaded load leaves idle runs that parity instead of waiting.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

from sovpack._io import machine_memory
from sovpack._protocols import Runner
from sovpack.artifact import ArtifactMetadata
from sovpack.convert import TargetJob, writers_memory
from sovpack.source.model import SourceModel
from sovpack.targets.base import MEMORY_SHARE, TargetRef, parity_memory


@dataclass
class RunnerPreload:
    """Opens ``ref``'s artifact on its runtime in the background once its writer is done (``on_written``)."""

    ref: TargetRef
    parameters: int  # the model's, for the runtimes' memory estimates
    _runner: Future[Runner] | None = field(default=None, init=False)

    @classmethod
    def beside(cls, model: SourceModel, together: list[TargetRef], first: TargetRef) -> RunnerPreload | None:
        """A preload of ``first`` (the first target judged) while ``together`` are written, if that fits."""
        if model.spec.encoder is not None or first not in together:
            return None  # an encoder's runner is opened per text batch; a 4-bit target is written in its turn
        parameters = model.spec.parameter_count()
        need = parity_memory([first], parameters) + writers_memory(model, len(together))
        if need > MEMORY_SHARE * machine_memory():
            return None
        return cls(first, parameters)

    def on_written(self, job: TargetJob, metadata: ArtifactMetadata) -> None:
        if job.ref != self.ref:
            return
        future: Future[Runner] = Future()
        self._runner = future

        def open_runner() -> None:
            try:
                future.set_result(self.ref.target.open_runner(job.directory, metadata))
            except BaseException as exc:  # handed to whoever takes the runner: raised where parity would open it
                future.set_exception(exc)

        threading.Thread(target=open_runner, name="sovpack-preload", daemon=True).start()

    def loading(self) -> bool:
        """Whether the runner is still being opened (its writer done, its runtime not yet ready)."""
        return self._runner is not None and not self._runner.done()

    def fits_beside(self, other: TargetRef) -> bool:
        """Whether ``other``'s parity run fits in memory while this runner is held open."""
        return parity_memory([self.ref, other], self.parameters) <= MEMORY_SHARE * machine_memory()

    def take(self, ref: TargetRef) -> Runner | None:
        """The opened runner for ``ref`` (waiting for it), or None: it is then the caller's to close."""
        if ref != self.ref or self._runner is None:
            return None
        future, self._runner = self._runner, None
        return future.result()

    def close(self) -> None:
        """Close a runner opened but never taken (the build failed before its parity run)."""
        if self._runner is not None:
            future, self._runner = self._runner, None
            with contextlib.suppress(Exception):  # the build's own error is the one to report
                future.result().close()
