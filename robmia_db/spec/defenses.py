"""Spec layer: the parameters each defense accepts (torch-free, so `check` validates them before any work).

The runner keeps the implementations in `robmia_db.runner.defenses`, keyed by the same names. A defense's
parameters are validated here, resolved ("auto" -> a number) and hashed into the model key.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class DefenseParams(BaseModel):
    """Base class: strict keys; `uses_eps` says whether the training eps is part of the model's identity."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
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

    @field_validator("step_size")
    @classmethod
    def _positive_step(cls, value: float | str) -> float | str:
        if not isinstance(value, str) and not value > 0:
            raise ValueError(f"must be > 0 (got {value:g})")
        return value

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


# --------------------------------------------------------------------------------------------------
# Shared field helpers for the defenses below

PRESET_DESCRIPTION = (
    '"default" = the original authors\' settings; "ccs2019" = the values Song et al. (CCS 2019) ran. A preset '
    'only fills the fields left at "auto"; it is not hashed into the model key itself'
)
_PERCENT_SUFFIX = "%"


def _number_text(value: float) -> str:
    return f"{value:g}"


def check_number(
    value: float | str, *, ge: float | None = None, gt: float | None = None, le: float | None = None
) -> float | str:
    """Range check for `float | "auto"` fields, with the message style of the spec loader."""
    if isinstance(value, str):
        return value
    if ge is not None and not value >= ge:
        raise ValueError(f"must be >= {_number_text(ge)} (got {_number_text(value)})")
    if gt is not None and not value > gt:
        raise ValueError(f"must be > {_number_text(gt)} (got {_number_text(value)})")
    if le is not None and not value <= le:
        raise ValueError(f"must be <= {_number_text(le)} (got {_number_text(value)})")
    return value


def parse_schedule_length(value: Any, allow_auto: bool = True) -> float | str:
    """A schedule length: a number of epochs (fractions allowed), "N%" of the training epochs, or "auto".

    Percentages are normalised ("10.0%" -> "10%") so that equal schedules hash equally.
    """
    message = 'must be a number of epochs >= 0 or a percentage of the training epochs like "10%"'
    if allow_auto:
        message = message.replace(" or a percentage", ", a percentage") + ', or "auto"'
    if isinstance(value, bool):
        raise ValueError(f"{message} (got {value!r})")
    if isinstance(value, (int, float)):
        if not value >= 0:
            raise ValueError(f"must be >= 0 (got {_number_text(value)})")
        return float(value)
    if isinstance(value, str):
        if value == "auto" and allow_auto:
            return value
        text = value.strip()
        if text.endswith(_PERCENT_SUFFIX):
            try:
                percent = float(text[:-1])
            except ValueError:
                percent = float("nan")
            if 0.0 <= percent <= 100.0:
                return f"{percent:g}%"
            if percent == percent:
                raise ValueError(f"must be a percentage between 0% and 100% (got {value!r})")
    raise ValueError(f"{message} (got {value!r})")


def _schedule_or_auto(value: Any) -> float | str:
    return parse_schedule_length(value, allow_auto=True)


def _schedule_no_auto(value: Any) -> float | str:
    """For defenses without presets: no "auto"."""
    return parse_schedule_length(value, allow_auto=False)


def schedule_epochs(value: float | str, epochs: int) -> float:
    """A resolved schedule length in epochs: numbers as they are, "N%" as N/100 of `epochs`."""
    if isinstance(value, str):
        if not value.endswith(_PERCENT_SUFFIX):
            raise ValueError(f"unresolved schedule length {value!r}")
        return float(value[:-1]) / 100.0 * epochs
    return float(value)


class PresetParams(DefenseParams):
    """A defense whose "auto" fields take their values from a named preset (`PRESETS[preset][field]`)."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    def _fill_presets(self, values: dict[str, Any]) -> dict[str, Any]:
        table = self.PRESETS[values.pop("preset")]
        for name, value in list(values.items()):
            if value == "auto" and name in table:
                values[name] = table[name]
        return values


# --------------------------------------------------------------------------------------------------
# Empirical defenses


class DistributionalAtParams(DefenseParams):
    """Sinha et al. 2018 (WRM): adversarial training against a Lagrangian-penalised, unconstrained attacker.

    Neither mode constrains the attacker to an eps ball, so the training eps is not part of the model's
    identity (a sweep over eps trains one distributional model). Evaluate it with the paper's eps-bounded
    PGD signal, not with the WRM point.
    """

    uses_eps: ClassVar[bool] = False
    summary: ClassVar[str] = (
        "Sinha WRM: CE on Lagrangian-penalised adversarial points (L2 original or CCS'19 L-inf/L1)"
    )

    mode: Literal["wrm", "ccs2019"] = Field(
        "wrm",
        description='"wrm" = Sinha\'s squared-L2 Lagrangian (first step (1/2gamma)*grad, then steps '
        "z <- z + (1/sqrt(t+2)) * ((1/2gamma)*grad - (z - x)), no projection, no clipping); "
        "\"ccs2019\" = the CCS'19 code's LinfWRMAttack (x' <- clip01(x' + g - mean|g| * sign(x' + g - x)), "
        "g = coefficient * grad, mean over the whole batch, no projection)",
    )
    steps: int | Literal["auto"] = Field(
        "auto",
        description='ascent steps; "auto" = 15 for wrm (after the first step, Sinha MNIST), 8 for ccs2019 '
        "(CCS'19 FMNIST; Yale and CIFAR-10 used 10)",
    )
    gamma: float = Field(
        0.5 / 1.3,
        description="wrm: Lagrangian penalty gamma > 0 (Sinha MNIST: the code's eps = 1/(2 gamma) = 1.3, "
        "gamma ~ 0.385). Ignored (and not hashed) in ccs2019 mode",
    )
    coefficient: float | Literal["auto"] = Field(
        "auto",
        description="ccs2019: gradient coefficient a > 0; \"auto\" = 1.0 (CCS'19 FMNIST). CCS'19 Yale 1.5; "
        "CIFAR-10 used 12 x 255 on 0-255 pixels, which is 12/255 ~ 0.047 on [0,1] inputs. Ignored (and not "
        "hashed) in wrm mode",
    )

    @field_validator("steps")
    @classmethod
    def _positive_steps(cls, value: int | str) -> int | str:
        return check_number(value, gt=0)

    @field_validator("gamma")
    @classmethod
    def _positive_gamma(cls, value: float) -> float:
        return check_number(value, gt=0)

    @field_validator("coefficient")
    @classmethod
    def _positive_coefficient(cls, value: float | str) -> float | str:
        return check_number(value, gt=0)

    def resolved(self, eps: float | None) -> dict[str, Any]:
        values = self.model_dump()
        if values["steps"] == "auto":
            values["steps"] = 15 if self.mode == "wrm" else 8
        if self.mode == "wrm":
            del values["coefficient"]
        else:
            del values["gamma"]
            if values["coefficient"] == "auto":
                values["coefficient"] = 1.0
        return values


class TradesParams(PresetParams):
    """Zhang et al. 2019: CE(f(x), y) + beta * max over the eps ball of KL(f(x) || f(x'))."""

    summary: ClassVar[str] = "TRADES: clean CE plus beta times the KL to the worst point in the eps ball"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"default": {"beta": 6.0}, "ccs2019": {"beta": 1.0}}

    preset: Literal["default", "ccs2019"] = Field("default", description=PRESET_DESCRIPTION)
    beta: float | Literal["auto"] = Field(
        "auto",
        description='weight of the KL term, >= 0; "auto" = 6.0 (default: TRADES CIFAR-10; TRADES MNIST used 1.0) '
        "or 1.0 (ccs2019: every dataset)",
    )
    steps: int = Field(
        10,
        gt=0,
        description="KL ascent steps (TRADES CIFAR-10 10, MNIST 40; CCS'19 FMNIST 8, Yale 10, CIFAR-10 10)",
    )
    step_size: float | Literal["auto"] = Field(
        "auto",
        description='sign-step size; "auto" = 2.5 * eps / steps. Original TRADES: 0.007 at eps 0.031 (CIFAR-10), '
        "0.01 at eps 0.3 (MNIST). CCS'19: FMNIST 0.02 at eps 0.1 (set it explicitly), Yale 0.0078 at 8/255, "
        "CIFAR-10 0.007",
    )
    init_std: float = Field(
        0.001, ge=0, description="the attack starts at x + init_std * N(0, I) (TRADES: 0.001)"
    )

    @field_validator("beta")
    @classmethod
    def _beta_range(cls, value: float | str) -> float | str:
        return check_number(value, ge=0)

    @field_validator("step_size")
    @classmethod
    def _step_range(cls, value: float | str) -> float | str:
        return check_number(value, gt=0)

    def resolved(self, eps: float | None) -> dict[str, Any]:
        values = self._fill_presets(self.model_dump())
        if values["step_size"] == "auto":
            values["step_size"] = round(2.5 * float(eps or 0.0) / self.steps, 12)
        return values


# --------------------------------------------------------------------------------------------------
# Verifiable defenses


class IbpParams(PresetParams):
    """Gowal et al. 2018: kappa * CE + (1 - kappa) * verified CE of the elided IBP margin bounds."""

    summary: ClassVar[str] = "interval bound propagation: clean CE mixed with the IBP verified CE"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # Gowal examples/train.py MNIST: 60k steps, warm-up 2k, ramp 10k
        "default": {"warmup_epochs": "3.33333%", "ramp_epochs": "16.6667%"},
        # CCS'19 FMNIST: 80k steps, warm-up 8k, ramp 30k
        "ccs2019": {"warmup_epochs": "10%", "ramp_epochs": "37.5%"},
    }

    preset: Literal["default", "ccs2019"] = Field("default", description=PRESET_DESCRIPTION)
    warmup_epochs: float | str = Field(
        "auto",
        description='epochs of clean CE at eps 0 before the ramp (fractional, counted per batch), or "N%" of '
        'training; "auto" = 3.33% (default: Gowal MNIST 2k of 60k steps) or 10% (ccs2019: FMNIST 8k of 80k '
        "steps; Yale 500 of 20k steps = 2.5%)",
    )
    ramp_epochs: float | str = Field(
        "auto",
        description="epochs over which eps grows linearly from 0 to eps_train and kappa from 1 to kappa_final; "
        '"auto" = 16.7% (default: Gowal MNIST 10k of 60k steps) or 37.5% (ccs2019: FMNIST 30k of 80k steps; '
        "Yale 6.5k of 20k steps = 32.5%)",
    )
    kappa_final: float = Field(
        0.5,
        ge=0,
        le=1,
        description="final weight of the clean CE (Gowal and CCS'19: 0.5; 0 = verified CE only)",
    )
    eps_train_factor: float = Field(
        1.0,
        gt=0,
        description="train at eps_train = factor * eps (Gowal MNIST: 0.33 for eps 0.3, i.e. 1.1; CCS'19: 1.0)",
    )

    _schedules = field_validator("warmup_epochs", "ramp_epochs", mode="before")(_schedule_or_auto)

    def resolved(self, eps: float | None) -> dict[str, Any]:
        return self._fill_presets(self.model_dump())


class CrownIbpParams(DefenseParams):
    """Zhang et al. 2020: kappa * CE + (1 - kappa) * verified CE of beta * CROWN-IBP + (1 - beta) * IBP.

    With t = eps_now / eps_train along the ramp: beta = 1 - t (1 - beta_final), kappa = 1 - t (1 - kappa_final).
    Not part of the CCS'19 paper, so there is no ccs2019 preset.
    """

    summary: ClassVar[str] = "CROWN-IBP: clean CE mixed with the verified CE of a CROWN-IBP / IBP bound mix"

    ramp_start_epochs: float | str = Field(
        "1%",
        description='epochs of clean CE before the eps ramp starts, or "N%" of training (CROWN-IBP MNIST: '
        "epoch 1 of 100; DM-large: 10 of 200; auto_LiRPA example: 3)",
    )
    ramp_epochs: float | str = Field(
        "60%",
        description='length of the linear eps ramp in epochs, or "N%" of training (CROWN-IBP MNIST: 60 of 100; '
        "DM-large: 50 of 200)",
    )
    beta_final: float = Field(
        0.0, ge=0, le=1, description="weight of the CROWN-IBP bound at full eps (1 at eps 0; CROWN-IBP: 0)"
    )
    kappa_final: float = Field(
        0.5,
        ge=0,
        le=1,
        description="weight of the clean CE at full eps (robust_natural: 0.5; method robust: 0)",
    )
    eps_train_factor: float = Field(
        1.0,
        gt=0,
        description="train at factor * eps (CROWN-IBP DM-large MNIST: eps_train 0.4 for eps 0.3, i.e. 1.33)",
    )

    _schedules = field_validator("ramp_start_epochs", "ramp_epochs", mode="before")(_schedule_no_auto)


class DiffAiParams(DefenseParams):
    """Mirman et al. 2018 (DiffAI v1) as the CCS'19 code ran it (`-d Box -t Box`).

    After `natural_epochs` of plain CE the loss is (tw * softplus(max_j r_j) + sw * CE) / (tw + sw), with
    r_j an upper bound of z_j - z_y over the box for j != y and r_y = -1. eps grows linearly from
    eps_start_factor * eps over `ramp_epochs`, then stays at eps. Gradients are clipped to norm 1.
    """

    summary: ClassVar[str] = (
        "DiffAI (box or zonotope): clean CE mixed with a softplus of the worst margin bound"
    )

    domain: Literal["box", "zonotope"] = Field(
        "box",
        description='"box" = unelided intervals, as CCS\'19 ran it; "zonotope" = DeepZ (costly: use 8x8 inputs)',
    )
    natural_epochs: float | str = Field(
        "20%",
        description='epochs of plain CE before the abstract loss starts, or "N%" of training (CCS\'19: 20 of 100)',
    )
    ramp_epochs: float | str = Field(
        "30%", description='epochs of the linear eps ramp after the CE phase, or "N%" (CCS\'19: 30 of 100)'
    )
    eps_start_factor: float = Field(
        1.0 / 30.0, ge=0, le=1, description="the ramp starts at this fraction of eps (DiffAI v1: 1/30)"
    )
    abstract_weight: float = Field(
        0.2, gt=0, description="tw, weight of the abstract loss (CCS'19 --tot-weight 0.2)"
    )
    natural_weight: float = Field(1.0, ge=0, description="sw, weight of the clean CE (DiffAI v1: 1)")
    grad_clip_norm: float = Field(
        1.0, ge=0, description="gradient-norm clip (DiffAI v1: 1.0); 0 = no clipping"
    )

    _schedules = field_validator("natural_epochs", "ramp_epochs", mode="before")(_schedule_no_auto)


class DualParams(PresetParams):
    """Wong & Kolter 2018: the robust CE of the dual (LP-relaxation) margin bounds only, no clean term.

    Training uses the exact bound, or with `projections = k` and `norm = "l1_median"` the random-projection
    estimate of Wong et al. 2018 (Cauchy projections, median estimator, inputs clipped to [0, 1]), as the
    CCS'19 authors trained (k = 20 Fashion-MNIST, 50 Yale). The estimate is not sound, so it is used for
    training only: verified signals always use the exact bound. Gradients are clipped to norm 1, as the CCS'19
    code did.
    """

    summary: ClassVar[str] = "Wong-Kolter dual bound: verified CE of the convex outer polytope, eps ramped"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # convex_adversarial MNIST scripts: eps 0.1 from 0.01; examples default schedule_length 10 of 20 epochs
        "default": {"eps_start_factor": 0.1, "ramp_epochs": "50%"},
        # CCS'19 FMNIST: eps 0.003 -> 0.1 over 20 of 61 epochs
        "ccs2019": {"eps_start_factor": 0.03, "ramp_epochs": "32.7869%"},
    }

    preset: Literal["default", "ccs2019"] = Field("default", description=PRESET_DESCRIPTION)
    eps_start_factor: float | Literal["auto"] = Field(
        "auto",
        description='the eps ramp starts at this fraction of eps; "auto" = 0.1 (default: convex_adversarial MNIST '
        "scripts, 0.01 for 0.1) or 0.03 (ccs2019: FMNIST 0.003 for 0.1; Yale 1e-4 for 16/255 is 0.0016)",
    )
    ramp_epochs: float | str = Field(
        "auto",
        description='epochs of the linear eps ramp from the start of training, or "N%"; "auto" = 50% (default: '
        "10 of 20 epochs) or 20 of 61 epochs = 32.8% (ccs2019 FMNIST; Yale: 80 of 181 epochs)",
    )
    grad_clip_norm: float = Field(
        1.0, ge=0, description="gradient-norm clip (CCS'19 code: 1.0); 0 = no clipping"
    )
    projections: int = Field(
        0,
        ge=0,
        description="k Cauchy random projections per l1 norm of the intermediate bounds, for training only (an "
        'unsound estimate; needs norm = "l1_median"); 0 = the exact bound. CCS\'19: 20 Fashion-MNIST, 50 Yale',
    )
    norm: Literal["l1", "l1_median"] = Field(
        "l1",
        validate_default=True,  # so that projections without norm = "l1_median" is an error, not ignored
        description='"l1" = exact l1 norms (projections = 0); "l1_median" = the median estimate over the '
        "projections (convex_adversarial's norm_type)",
    )

    _schedules = field_validator("ramp_epochs", mode="before")(_schedule_or_auto)

    @field_validator("norm")
    @classmethod
    def _norm_matches_projections(cls, value: str, info: ValidationInfo) -> str:
        projections = info.data.get("projections")
        if projections is None:
            return value
        if value == "l1_median" and projections == 0:
            raise ValueError('"l1_median" estimates norms from random projections: set projections = k > 0')
        if value == "l1" and projections > 0:
            raise ValueError(
                f'projections = {projections} needs norm = "l1_median" (the exact "l1" uses none)'
            )
        return value

    @field_validator("eps_start_factor")
    @classmethod
    def _factor_range(cls, value: float | str) -> float | str:
        return check_number(value, ge=0, le=1)

    def resolved(self, eps: float | None) -> dict[str, Any]:
        values = self._fill_presets(self.model_dump())
        if values["projections"] == 0:
            # The exact bound hashes as before these options existed, so stored exact models keep their keys.
            del values["projections"], values["norm"]
        return values


register_defense_params("distributional_at", DistributionalAtParams)
register_defense_params("trades", TradesParams)
register_defense_params("ibp", IbpParams)
register_defense_params("crown_ibp", CrownIbpParams)
register_defense_params("diffai", DiffAiParams)
register_defense_params("dual", DualParams)
