"""Spec layer: the strict pydantic schema of a TOML experiment spec.

Imports nothing of ours but `errors` and `spec.defenses`. Field descriptions are the reference
documentation (`robmia-db check --explain` prints them).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
INT32_MAX = 2**31 - 1  # the store's INTEGER columns (seed, counts, ids): larger values cannot be stored


class Strict(BaseModel):
    # strict: `eps = true` or `epochs = "1"` is an error, never a coercion; no inf/nan anywhere
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _as_list(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


class ExperimentSection(Strict):
    name: str = Field(pattern=NAME_PATTERN, description="experiment name (metadata: renaming never retrains)")
    description: str = Field("", description="free text (metadata)")


class DataSection(Strict):
    dataset: str = Field(
        description="registry name: digits, mnist, fashion_mnist, cifar10, yale, npz (no default: a spec "
        "names its data)"
    )
    root: str | None = Field(None, description="folder or file to read the dataset from (else $ROBMIA_DATA)")
    split_seed: int = Field(0, ge=0, le=INT32_MAX, description="seed of the member / non-member split")
    n_train: int | None = Field(
        None,
        gt=0,
        le=INT32_MAX,
        description="use a seeded subset of this many examples of the dataset's train split",
    )
    n_test: int | None = Field(
        None,
        gt=0,
        le=INT32_MAX,
        description="use a seeded subset of this many examples of the dataset's test split",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="loader options (e.g. Yale split)")


class MembershipSection(Strict):
    scheme: Literal["train_test", "random_halves"] = Field(
        "train_test",
        description="train_test: members = a seeded training split, non-members = the held-out rest (the "
        "paper's scheme); random_halves: each of n_models models trains on its own seeded random half",
    )
    n_members: int | None = Field(
        None, gt=0, le=INT32_MAX, description="train_test: number of members (default: the whole train split)"
    )
    n_nonmembers: int | None = Field(
        None,
        gt=0,
        le=INT32_MAX,
        description="train_test: number of evaluated non-members (default: all the rest)",
    )
    n_models: int = Field(1, gt=0, le=1024, description="random_halves: models in the population")
    population: int | None = Field(
        None, gt=1, le=INT32_MAX, description="random_halves: population size (default: every example)"
    )


class ModelSection(Strict):
    arch: Literal["mlp", "cnn", "yale_vgg", "fmnist_vgg", "wide_resnet"] = Field(
        "cnn", description="architecture (plain nn.Sequential except wide_resnet)"
    )
    width: list[Annotated[float, Field(gt=0, le=1000)]] = Field(
        default_factory=lambda: [1.0], min_length=1, description="width multiplier, or a list to sweep"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="architecture options (depth, ...)")

    _lists = field_validator("width", mode="before")(_as_list)


class OptimizerSection(Strict):
    name: Literal["adam", "sgd"] = Field("adam", description="optimizer: adam or sgd")
    lr: float = Field(1e-3, gt=0, description="learning rate")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (ignored by adam)")


class LrScheduleSection(Strict):
    name: Literal["constant", "multistep", "cosine"] = Field(
        "constant", description="learning-rate schedule, stepped per epoch: constant, multistep or cosine"
    )
    milestones: list[Annotated[int, Field(gt=0, le=INT32_MAX)]] = Field(
        default_factory=list, description="multistep: epochs at which lr is multiplied by gamma"
    )
    gamma: float = Field(0.1, gt=0, le=1, description="multistep: factor at each milestone")


class TrainingSection(Strict):
    defenses: list[str] = Field(
        default_factory=lambda: ["natural"], min_length=1, description="defenses to train (a sweep axis)"
    )
    eps: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=lambda: [0.1],
        min_length=1,
        description="L-inf training budget on [0,1] inputs (a sweep axis)",
    )
    seeds: list[Annotated[int, Field(ge=0, le=INT32_MAX)]] = Field(
        default_factory=lambda: [0], min_length=1, description="training seeds (a sweep axis)"
    )
    epochs: int = Field(20, gt=0, le=100000, description="passes over the members")
    batch_size: int = Field(64, gt=0, le=INT32_MAX, description="training batch size")
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    lr_schedule: LrScheduleSection = Field(default_factory=LrScheduleSection)

    _lists = field_validator("defenses", "eps", "seeds", mode="before")(_as_list)

    @field_validator("defenses")
    @classmethod
    def _known_defenses(cls, value: list[str]) -> list[str]:
        from robmia_db.spec.defenses import DEFENSE_PARAMS

        for name in value:
            if name not in DEFENSE_PARAMS:
                raise ValueError(f"unknown defense {name!r} (known: {', '.join(sorted(DEFENSE_PARAMS))})")
        if len(set(value)) != len(value):
            raise ValueError("lists a defense twice")
        return value


class BenignSignal(Strict):
    kind: Literal["benign"]
    name: str = Field("benign", pattern=NAME_PATTERN)


class AdversarialSignal(Strict):
    kind: Literal["adversarial"]
    name: str = Field("pgd", pattern=NAME_PATTERN)
    eps: float | Literal["auto"] = Field("auto", description='PGD budget; "auto" = the model\'s training eps')
    steps: int = Field(20, gt=0, le=10000, description="PGD steps (paper: 20)")
    step_size: float | Literal["auto"] = Field("auto", description='"auto" = 2.5 * eps / steps (paper)')
    random_start: bool = Field(False, description="uniform random start (paper: no)")
    seed: int = Field(0, ge=0, le=INT32_MAX, description="seed of the random start")

    @field_validator("eps", "step_size")
    @classmethod
    def _positive(cls, value: float | str) -> float | str:
        if not isinstance(value, str) and not value > 0:
            raise ValueError(f"must be > 0 (got {value:g})")
        return value


class VerifiedSignal(Strict):
    kind: Literal["verified"]
    name: str = Field("verified", pattern=NAME_PATTERN)
    method: Literal["ibp", "crown_ibp", "crown", "dual", "zonotope"] = Field(
        "crown", description="bound used for the worst-case logits"
    )
    eps: float | Literal["auto"] = "auto"

    @field_validator("eps")
    @classmethod
    def _positive(cls, value: float | str) -> float | str:
        if not isinstance(value, str) and not value > 0:
            raise ValueError(f"must be > 0 (got {value:g})")
        return value


SignalSpec = Annotated[BenignSignal | AdversarialSignal | VerifiedSignal, Field(discriminator="kind")]


class AttacksSection(Strict):
    names: list[str] = Field(default_factory=list, description="attacks to score (empty = every attack)")
    paths: list[str] = Field(default_factory=list, description="extra attack files or folders")


class RuntimeSection(Strict):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="never part of a model's identity")
    threads: int | None = Field(None, gt=0, le=256, description="torch threads (default 1 on CPU)")
    eval_batch_size: int = Field(512, gt=0, le=INT32_MAX, description="batch size for recording signals")


class ExperimentSpec(Strict):
    experiment: ExperimentSection
    data: DataSection
    membership: MembershipSection = Field(default_factory=MembershipSection)
    model: ModelSection = Field(default_factory=ModelSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    defense: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-defense parameters, e.g. [defense.pgd_at] steps = 10"
    )
    signals: list[SignalSpec] = Field(
        default_factory=lambda: [BenignSignal(kind="benign")], description="perturbations to record"
    )
    attacks: AttacksSection = Field(default_factory=AttacksSection)
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)

    @model_validator(mode="after")
    def _unique_signal_names(self) -> ExperimentSpec:
        names = [s.name for s in self.signals]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"signals: name {duplicates[0]!r} is used twice; give each perturbation its own name"
            )
        return self
