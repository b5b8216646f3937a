"""Spec layer: TOML -> strict pydantic models -> concrete jobs with content keys.

May import: `robmia_db.errors` and the numpy-only `robmia_db.datasets` registry. Never the runner or torch.
"""

from __future__ import annotations

from robmia_db.spec.load import LoadedSpec, ModelJob, PerturbationJob, load_specs, read_spec
from robmia_db.spec.models import ExperimentSpec

__all__ = ["ExperimentSpec", "LoadedSpec", "ModelJob", "PerturbationJob", "load_specs", "read_spec"]
