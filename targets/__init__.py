"""Output formats: one package each (writer + runtime runner), registered in ``TARGETS`` on import.

Adding a format is one package here; ``load_targets`` finds it.
"""

from __future__ import annotations

from sovpack.targets.base import TARGETS, TargetRef, load_targets, register_target

__all__ = ["TARGETS", "TargetRef", "load_targets", "register_target"]
