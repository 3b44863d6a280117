"""Structured configs: the types and ranges of every config group, stored in Hydra's ConfigStore.

Each YAML option in `configs/<group>/` starts from one of these schemas
(`defaults: [/schema/<group>/<name>@_here_]`),
so a wrongly typed override (`hypergrad.steps=abc`) fails when Hydra composes the config, and an
out-of-range value (`inner_optim.lr=-1`) fails when `validate` builds the dataclasses, before any
work starts. Library code never sees these objects: the builders turn them into plain arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

__all__ = ["TrainSchema", "ConfigError", "register_configs", "validate"]

LOOPS = ("hpo", "online", "fewshot")


class ConfigError(ValueError):
    """A config value is out of its allowed range; the message names the key."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        _check(v is None or v > 0, f"{n} must be > 0, got {v}")


def _non_negative(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        _check(v >= 0, f"{n} must be >= 0, got {v}")


def _unit(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        _check(0 <= v < 1, f"{n} must be in [0, 1), got {v}")


# ----------------------------------------------------------------------------- task
@dataclass
class DigitsTaskSchema:
    _target_: str = "metagrad.app.data.DigitsTask"
    batch_size: int = 100
    val_size: int = 400
    test_size: int = 400
    outer_batch_size: int | None = None
    split_seed: int = 0
    dtype: str = "float32"
    in_features: int = 64
    out_features: int = 10

    def __post_init__(self) -> None:
        _positive(self, "batch_size", "val_size", "outer_batch_size")
        _non_negative(self, "test_size")
        _check(
            self.dtype in ("float32", "float64"),
            f"dtype must be float32 or float64, got {self.dtype}",
        )


@dataclass
class SinusoidTaskSchema:
    _target_: str = "metagrad.app.fewshot.SinusoidTask"
    shots: int = 10
    query_shots: int = 10
    meta_batch: int = 25
    eval_tasks: int = 600
    eval_query: int = 100
    eval_steps: list[int] = field(default_factory=lambda: [1, 10])
    dtype: str = "float32"
    in_features: int = 1
    out_features: int = 1

    def __post_init__(self) -> None:
        _positive(self, "shots", "query_shots", "meta_batch", "eval_tasks", "eval_query")
        _check(
            all(s >= 0 for s in self.eval_steps), f"eval_steps must be >= 0, got {self.eval_steps}"
        )


# ----------------------------------------------------------------------------- model
@dataclass
class MLPSchema:
    _target_: str = "metagrad.app.models.mlp"
    in_features: int = 64
    hidden: list[int] = field(default_factory=lambda: [128])
    out_features: int = 10
    activation: str = "relu"

    def __post_init__(self) -> None:
        _positive(self, "in_features", "out_features")
        _check(all(h > 0 for h in self.hidden), f"hidden sizes must be > 0, got {self.hidden}")


# ----------------------------------------------------------------------------- inner optimizers
@dataclass
class SGDSchema:
    _target_: str = "metagrad.optim.SGD"
    _partial_: bool = True
    lr: float = 0.1
    momentum: float = 0.9
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        _positive(self, "lr")
        _unit(self, "momentum")
        _non_negative(self, "weight_decay", "dampening")


@dataclass
class AdamSchema:
    _target_: str = "metagrad.optim.Adam"
    _partial_: bool = True
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False

    def __post_init__(self) -> None:
        _positive(self, "lr", "eps")
        _non_negative(self, "weight_decay")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"betas must be two values in [0, 1), got {self.betas}",
        )


@dataclass
class RMSpropSchema:
    _target_: str = "metagrad.optim.RMSprop"
    _partial_: bool = True
    lr: float = 1e-2
    alpha: float = 0.99
    eps: float = 1e-8
    momentum: float = 0.0
    weight_decay: float = 0.0
    centered: bool = False

    def __post_init__(self) -> None:
        _positive(self, "lr", "eps")
        _unit(self, "alpha", "momentum")
        _non_negative(self, "weight_decay")


@dataclass
class AdagradSchema:
    _target_: str = "metagrad.optim.Adagrad"
    _partial_: bool = True
    lr: float = 1e-2
    lr_decay: float = 0.0
    weight_decay: float = 0.0
    initial_accumulator_value: float = 0.0
    eps: float = 1e-10

    def __post_init__(self) -> None:
        _positive(self, "lr", "eps")
        _non_negative(self, "weight_decay", "lr_decay", "initial_accumulator_value")


@dataclass
class OnlineSGDSchema:
    """A stock `torch.optim`-style optimizer for the online loop (SGD, or SGD-HD)."""

    _target_: str = "metagrad.online.SGDHD"
    _partial_: bool = True
    lr: float = 1e-3
    momentum: float = 0.0
    hypergrad_lr: float | None = 1e-3  # None: a plain optimizer without it (torch.optim.SGD)
    multiplicative: bool | None = False  # update the lr multiplicatively (it stays positive)

    def __post_init__(self) -> None:
        _positive(self, "lr")
        _unit(self, "momentum")
        _check(
            self.hypergrad_lr is None or self.hypergrad_lr >= 0,
            f"hypergrad_lr must be >= 0, got {self.hypergrad_lr}",
        )


@dataclass
class OnlineAdamSchema:
    _target_: str = "metagrad.online.AdamHD"
    _partial_: bool = True
    lr: float = 1e-3
    hypergrad_lr: float | None = 1e-7
    multiplicative: bool | None = False

    def __post_init__(self) -> None:
        _positive(self, "lr")
        _check(
            self.hypergrad_lr is None or self.hypergrad_lr >= 0,
            f"hypergrad_lr must be >= 0, got {self.hypergrad_lr}",
        )


# ----------------------------------------------------------------------------- meta
CONSTRAINTS = ("positive", "unit", "none")
SCOPES = ("scalar", "per_layer", "per_element")


@dataclass
class MetaEntrySchema:
    """One learnable hyperparameter of the inner optimizer."""

    init: float | None = None  # None: the inner optimizer's configured value
    constraint: str = "positive"
    scope: str = "scalar"
    per_step: bool = False  # one value per inner step (a schedule over the horizon)

    def __post_init__(self) -> None:
        _check(
            self.init is None
            or (isinstance(self.init, (int, float)) and not isinstance(self.init, bool)),
            f"init must be a number or null, got {self.init!r}",
        )
        _check(
            self.constraint in CONSTRAINTS,
            f"constraint must be one of {CONSTRAINTS}, got {self.constraint}",
        )
        _check(self.scope in SCOPES, f"scope must be one of {SCOPES}, got {self.scope}")
        _check(
            isinstance(self.per_step, bool),
            f"per_step must be true or false, got {self.per_step!r}",
        )


@dataclass
class HPOMetaSchema:
    """Which inner-optimizer hyperparameters are learned, and in which scope.

    `learn` maps a hyperparameter name to a `MetaEntrySchema`-like mapping. It is typed loosely
    so that entries can be added from the command line
    (`+meta.learn.weight_decay={init:0.001,scope:per_layer}`); each entry is checked here.
    """

    learn: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(bool(self.learn), "learn must name at least one hyperparameter")
        allowed = ("init", "constraint", "scope", "per_step")
        for name, entry in self.learn.items():
            _check(
                isinstance(entry, dict),
                f"learn.{name} must be a mapping like {{init: 0.01, scope: per_layer}}, "
                f"got {entry!r}",
            )
            unknown = sorted(set(entry) - set(allowed))
            _check(not unknown, f"learn.{name} has unknown keys {unknown} (allowed: {allowed})")
            try:
                MetaEntrySchema(**entry)
            except ValueError as e:
                raise ValueError(f"learn.{name}.{e}") from None


def meta_entry(entry: Any) -> MetaEntrySchema:
    """A `meta.learn` entry (a config node or mapping) as a checked `MetaEntrySchema`."""
    if OmegaConf.is_config(entry):
        entry = OmegaConf.to_container(entry, resolve=True)
    return MetaEntrySchema(**entry)


SOLVERS = ("cg", "neumann", "fixed_point")


@dataclass
class LearnerSchema:
    """What every learner from `metagrad.learners` takes; the app passes the model and inner optimizer.

    One subclass per constructor family, each checking its own ranges.
    """

    _target_: str = MISSING
    _partial_: bool = True
    loss_fn: str = "mse"
    inner_lr: float = 0.01
    inner_steps: int = 1
    vectorize: Any = "auto"

    def __post_init__(self) -> None:
        _positive(self, "inner_lr", "inner_steps")
        _check(
            self.vectorize in ("auto", True, False),
            f"vectorize must be auto, true or false, got {self.vectorize!r}",
        )


@dataclass
class MAMLLearnerSchema(LearnerSchema):
    """MAML, MetaSGD, ANIL, MAMLPlusPlus: learners that differentiate the inner trajectory."""

    _target_: str = "metagrad.learners.MAML"
    first_order: bool = False


@dataclass
class ReptileLearnerSchema(LearnerSchema):
    """Reptile: first order by construction, so it has no `first_order`."""

    _target_: str = "metagrad.learners.Reptile"
    inner_steps: int = 5


@dataclass
class IMAMLLearnerSchema(LearnerSchema):
    """iMAML: a proximally regularized inner problem, differentiated implicitly."""

    _target_: str = "metagrad.learners.iMAML"
    inner_steps: int = 10
    lam: float = 1.0  # proximal strength
    solver: str = "cg"
    solver_iters: int = 10
    damping: float = 0.0
    step_size: float = 0.1  # of the neumann and fixed_point solvers

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "lam", "solver_iters", "step_size")
        _non_negative(self, "damping")
        _check(self.solver in SOLVERS, f"solver must be one of {SOLVERS}, got {self.solver}")


@dataclass
class LearnerMetaSchema:
    """A meta-learning algorithm from `metagrad.learners` (its model and loss come from the task)."""

    algo: Any = MISSING


@dataclass
class FewShotMetaSchema(LearnerMetaSchema):
    """A learner of the MAML family; Meta-SGD and MAML++ also learn inner learning rates."""

    lr_outer_lr: float | None = (
        None  # outer lr of learned inner lrs (Meta-SGD); None: outer_optim.lr
    )

    def __post_init__(self) -> None:
        _positive(self, "lr_outer_lr")


@dataclass
class NoMetaSchema:
    """Nothing is meta-learned by the outer loop (online hypergradient descent)."""


# ----------------------------------------------------------------------------- hypergradients
@dataclass
class UnrolledSchema:
    _target_: str = "metagrad.hypergrad.Unrolled"


@dataclass
class TruncatedSchema:
    _target_: str = "metagrad.hypergrad.Truncated"
    k: int = 10

    def __post_init__(self) -> None:
        _positive(self, "k")


@dataclass
class FirstOrderSchema:
    _target_: str = "metagrad.hypergrad.FirstOrder"


@dataclass
class CheckpointedSchema:
    _target_: str = "metagrad.hypergrad.Checkpointed"
    segment: int | None = None  # None: about sqrt(T)

    def __post_init__(self) -> None:
        _positive(self, "segment")


@dataclass
class ForwardModeSchema:
    _target_: str = "metagrad.hypergrad.ForwardMode"
    max_directions: int = 64

    def __post_init__(self) -> None:
        _positive(self, "max_directions")


@dataclass
class ImplicitSchema:
    _target_: str = "metagrad.hypergrad.Implicit"
    solver: str = "cg"
    iters: int = 20
    damping: float = 0.0
    step_size: float = 0.1
    tol: float | None = None

    def __post_init__(self) -> None:
        _check(
            self.solver in ("cg", "neumann", "fixed_point"),
            f"solver must be cg, neumann or fixed_point, got {self.solver}",
        )
        _positive(self, "iters", "step_size")
        _non_negative(self, "damping")


@dataclass
class HypergradSchema:
    """The inner horizon T and the estimator that differentiates through it."""

    steps: int = 50
    estimator: Any = MISSING

    def __post_init__(self) -> None:
        _positive(self, "steps")


# ----------------------------------------------------------------------------- outer optimizer
@dataclass
class OuterAdamSchema:
    _target_: str = "torch.optim.Adam"
    _partial_: bool = True
    lr: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _positive(self, "lr")
        _non_negative(self, "weight_decay")


@dataclass
class OuterSGDSchema:
    _target_: str = "torch.optim.SGD"
    _partial_: bool = True
    lr: float = 0.1
    momentum: float = 0.0

    def __post_init__(self) -> None:
        _positive(self, "lr")
        _unit(self, "momentum")


# ----------------------------------------------------------------------------- logger
@dataclass
class TensorBoardSchema:
    _target_: str = "metagrad.app.logger.TensorBoardLogger"
    _partial_: bool = True
    flush_secs: int = 10
    histogram_every: int = 10
    figure_every: int = 50

    def __post_init__(self) -> None:
        _positive(self, "flush_secs", "histogram_every", "figure_every")


@dataclass
class NullLoggerSchema:
    """No event files. Takes the TensorBoard logger's intervals (and ignores them), so a preset
    that tunes them also runs with `logger=none`."""

    _target_: str = "metagrad.app.logger.NullLogger"
    _partial_: bool = True
    flush_secs: int = 10
    histogram_every: int = 10
    figure_every: int = 50


# ----------------------------------------------------------------------------- the whole run
@dataclass
class TrainSchema:
    """The top level of `configs/train.yaml`."""

    task: Any = MISSING
    model: Any = MISSING
    inner_optim: Any = MISSING
    meta: Any = MISSING
    hypergrad: Any = None
    outer_optim: Any = None
    logger: Any = MISSING
    loop: str = "hpo"  # hpo | online | fewshot
    seed: int = 0
    outer_steps: int = 100
    val_every: int = 10
    eval_steps: int | None = None  # inner steps of the validation runs; None: hypergrad.steps
    checkpoint_every: int = 20
    resume: bool = False
    max_nonfinite: int = 5
    progress: bool | None = None  # None: only when stderr is a terminal
    threads: int | None = None

    def __post_init__(self) -> None:
        _check(self.loop in LOOPS, f"loop must be one of {LOOPS}, got {self.loop}")
        _positive(
            self,
            "outer_steps",
            "val_every",
            "checkpoint_every",
            "max_nonfinite",
            "threads",
            "eval_steps",
        )


_GROUPS: dict[str, dict[str, Any]] = {
    "task": {"digits": DigitsTaskSchema, "sinusoid": SinusoidTaskSchema},
    "model": {"mlp": MLPSchema},
    "inner_optim": {
        "sgd": SGDSchema,
        "adam": AdamSchema,
        "rmsprop": RMSpropSchema,
        "adagrad": AdagradSchema,
        "online_sgd": OnlineSGDSchema,
        "online_adam": OnlineAdamSchema,
    },
    "meta": {
        "hpo": HPOMetaSchema,
        "fewshot": FewShotMetaSchema(algo=MAMLLearnerSchema()),  # the MAML family
        "reptile": LearnerMetaSchema(algo=ReptileLearnerSchema()),
        "imaml": LearnerMetaSchema(algo=IMAMLLearnerSchema()),
        "none": NoMetaSchema,
    },
    "hypergrad": {
        "unrolled": HypergradSchema(estimator=UnrolledSchema()),
        "truncated": HypergradSchema(estimator=TruncatedSchema()),
        "first_order": HypergradSchema(estimator=FirstOrderSchema()),
        "checkpointed": HypergradSchema(estimator=CheckpointedSchema()),
        "forward": HypergradSchema(estimator=ForwardModeSchema()),
        "implicit": HypergradSchema(estimator=ImplicitSchema()),
    },
    "outer_optim": {"adam": OuterAdamSchema, "sgd": OuterSGDSchema},
    "logger": {"tensorboard": TensorBoardSchema, "none": NullLoggerSchema},
}


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore as `schema/<group>/<name>` (idempotent).

    A YAML option starts from its schema with `- /schema/<group>/<name>@_here_` in its
    defaults list; keeping the schemas in their own `schema/` groups keeps them out of the
    option lists users pick from.
    """
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainSchema)
    for group, options in _GROUPS.items():
        for name, node in options.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


def validate(cfg: DictConfig) -> None:
    """Check the ranges of every value by building the schema dataclasses.

    Raises:
        ConfigError: naming the key and the allowed range, e.g.
            `inner_optim.lr must be > 0, got -1.0`.
    """
    for key in cfg:
        node = cfg._get_node(key)
        if isinstance(node, DictConfig):
            _validate_node(node, str(key))
    top = {k: v for k, v in cfg.items() if not OmegaConf.is_config(v)}
    try:
        TrainSchema(**top)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"Invalid config: {e}") from None


def _validate_node(node: DictConfig, path: str) -> None:
    """Validate the children of `node` first, so a message names the deepest key."""
    if node._is_none() or node._is_missing():
        return
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _validate_node(child, f"{path}.{key}")
    if OmegaConf.get_type(node) in (dict, None):
        return
    try:
        OmegaConf.to_object(node)
    except ValueError as e:
        raise ConfigError(f"Invalid config: {path}.{e}") from None
