"""Spec layer: the parameters each defense accepts (torch-free, so `check` validates them before any work).

The runner keeps the implementations in `robmia_db.runner.defenses`, keyed by the same names. A defense's
parameters are validated here, resolved ("auto" -> a number) and hashed into the model key.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class DefenseParams(BaseModel):
    """Base class: strict keys; `uses_eps` says whether the training eps is part of the model's identity."""

    model_config = ConfigDict(extra="forbid")
    uses_eps: ClassVar[bool] = True
    summary: ClassVar[str] = ""

    def resolved(self, eps: float | None) -> dict[str, Any]:
        """Parameters with every "auto" replaced by its value for this eps (what the model key hashes)."""
        return self.model_dump()


class NaturalParams(DefenseParams):
    uses_eps: ClassVar[bool] = False
    summary: ClassVar[str] = "plain cross-entropy on clean batches"


class PgdAtParams(DefenseParams):
    """Madry et al. 2018: train on L-inf PGD examples only (uniform random start, sign steps, projection)."""

    summary: ClassVar[str] = "Madry PGD adversarial training on the adversarial batch only"

    steps: int = Field(10, gt=0, description="PGD steps of the inner maximisation")
    step_size: float | Literal["auto"] = Field(
        "auto", description='step size alpha; "auto" = 2.5 * eps / steps (eps/4 for 10 steps)'
    )
    random_start: bool = Field(True, description="start from a uniform point in the eps ball")
    eps_ramp_epochs: float = Field(
        0.0, ge=0, description="ramp eps linearly from 0 over this many epochs (per batch); 0 = no ramp"
    )

    def resolved(self, eps: float | None) -> dict[str, Any]:
        values = self.model_dump()
        if values["step_size"] == "auto":
            values["step_size"] = round(2.5 * float(eps or 0.0) / self.steps, 12)
        return values


DEFENSE_PARAMS: dict[str, type[DefenseParams]] = {
    "natural": NaturalParams,
    "pgd_at": PgdAtParams,
}


def register_defense_params(name: str, params: type[DefenseParams]) -> None:
    DEFENSE_PARAMS[name] = params


def defense_names() -> list[str]:
    return sorted(DEFENSE_PARAMS)
