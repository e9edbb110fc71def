"""The settings schema: what a run asks for, validated at the edge (YAML or a dict).

``RunConfig`` is written as ``config.yaml`` by the app and the command line alike;
``TrainSettings`` is the one model of the fine-tuning settings (:func:`osrm_core.train.finetune`
takes it as it is); ``MergeSettings`` the merge sweep. Every problem is one
:class:`ConfigError` line naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from osrm_core.constraints import CONSTRAINTS, check_constraint, get_constraint
from osrm_core.errors import ConfigError, OsrmInputError
from osrm_core.inits import get_init

#: A registered init or training constraint: the registries check config values.
InitName = Annotated[str, AfterValidator(lambda v: get_init(v).name)]
ConstraintName = Annotated[str, AfterValidator(lambda v: get_constraint(v).name)]
DEFAULT_LAMBDAS = [round(0.1 * i, 1) for i in range(1, 11)]


def read_yaml(path: str | Path, what: str) -> tuple[object, str]:
    """The parsed YAML of ``path`` and its file name (for messages); ConfigError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")), path.name
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path.name}: not valid YAML ({str(err).splitlines()[0]})") from None


def validate_settings(cls: type[BaseModel], data, where: str):
    """``cls.model_validate(data)`` with the first problem as a one-line ConfigError naming the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping of settings")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(x) for x in e["loc"] if x != "[key]")  # empty for a check of the whole config
        message = e["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{where}: {loc}: {message}" if loc else f"{where}: {message}") from None


class TaskEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="task name, used in file names")
    spec: str = Field(description="demo:KEY, a CSV/JSONL file, a folder with train/test, or hf:DATASET")
    text: str = "text"
    label: str = "label"
    text_pair: str | None = None
    metric: Literal["accuracy", "mcc", "f1", "loss"] | None = Field(
        None, description="how the task is scored (default accuracy; loss for unlabeled texts)"
    )



def check_sparse_b_share(name: str, value: float) -> float:
    """``b_density`` in (0, 1] or ``calibration`` in (0, 1); ValueError naming the field and the range."""
    ok, allowed = (0 < value <= 1, "(0, 1]") if name == "b_density" else (0 < value < 1, "(0, 1)")
    if not ok:
        raise OsrmInputError(f"{name} must be in {allowed}, got {value!r}")
    return value


class TrainSettings(BaseModel):
    """Fine-tuning settings (the ``train:`` section of a run config).

    ``lr`` is the learning rate of the LoRA matrices, ``head_lr`` that of the classification
    head (default ``lr``), ``a_lr_scale`` multiplies ``lr`` for the A matrices (makes up for a
    low-energy subspace); ``constraint`` keeps A in its subspace during training and
    ``penalty_beta`` weighs the ``penalty`` constraint; ``b_density`` and ``calibration`` set the
    ``sparse_B`` constraint (LoRI): the share of B's entries kept, and the share of the steps B
    trains densely before its mask is fixed (see :mod:`osrm_core.constraints`). ``length_group``
    batches are drawn together, sorted by length and cut again (less padding; 1 takes the
    examples as drawn, see :func:`osrm_core.train.training_batches`).
    """

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-4, gt=0)
    head_lr: float | None = Field(None, gt=0)
    a_lr_scale: float = Field(1.0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    constraint: ConstraintName = Field("none", description="training constraint: " + ", ".join(CONSTRAINTS))
    penalty_beta: float = Field(1e-3, ge=0)
    b_density: float = Field(0.1, description="sparse_B: share of B's entries kept, in (0, 1] (LoRI: 0.1)")
    calibration: float = Field(
        0.1, description="sparse_B: share of the steps B trains densely before its mask is fixed, in (0, 1)")
    eval_batch_size: int = Field(64, ge=1)
    length_group: int = Field(16, ge=1, description="batches drawn together and grouped by length (1: off)")

    @field_validator("b_density", "calibration")
    @classmethod
    def _share(cls, v: float, info) -> float:
        return check_sparse_b_share(info.field_name, v)

    def mask_step(self) -> int:
        """The step after which ``sparse_B`` fixes B's mask: ``calibration * steps``, rounded,
        at least 1 and at most ``steps``."""
        return min(self.steps, max(1, round(self.calibration * self.steps)))


class InitSettings(BaseModel):
    """One init's own settings in a run (``per_init:`` of a run config); unset fields take the
    run's. A run can so compare recipes, e.g. standard LoRA at rank 8 against ``osrm_gen`` with
    A frozen at rank 32 (see :meth:`RunConfig.for_init`)."""

    model_config = ConfigDict(extra="forbid")
    rank: int | None = Field(None, ge=1)
    alpha: float | None = Field(None, gt=0)
    constraint: ConstraintName | None = None
    lr: float | None = Field(None, gt=0)
    a_lr_scale: float | None = Field(None, ge=0)


class MergeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    methods: list[str] = Field(default_factory=lambda: ["task_arithmetic", "ties"])
    lambdas: list[float] = Field(default_factory=lambda: list(DEFAULT_LAMBDAS))
    densities: list[float] = Field(default_factory=lambda: [0.5])
    params: dict[str, list] = Field(
        default_factory=dict,
        description="values to sweep of the methods' other parameters, e.g. {alpha: [0.5, 0.9]} (RegMean); "
        "a parameter not named keeps its default",
    )

    @field_validator("params")
    @classmethod
    def _params(cls, v: dict[str, list]) -> dict[str, list]:
        from osrm_core.merge import MERGE_METHODS, all_param_specs

        known = [n for n in all_param_specs() if n != "density"]
        for name, values in v.items():
            if name not in known:
                raise OsrmInputError(f"unknown merge parameter {name!r} (density has its own list, densities); "
                                 f"known: {', '.join(known)}")
            if not isinstance(values, list) or not values:
                raise OsrmInputError(f"params.{name} must be a non-empty list of values")
            method = next(m for m in MERGE_METHODS.values() if name in [p.name for p in m.param_specs()])
            for value in values:
                method(**{name: value})  # each method checks its own values (ValueError naming them)
        return v

    @field_validator("methods")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from osrm_core.merge import MERGE_METHODS

        for m in v:
            if m not in MERGE_METHODS:
                raise OsrmInputError(f"unknown merge method {m!r}; known: {', '.join(MERGE_METHODS)}")
        if not v:
            raise OsrmInputError("at least one merge method is needed")
        return v

    @field_validator("lambdas", "densities")
    @classmethod
    def _grid(cls, v: list[float], info) -> list[float]:
        high = 10 if info.field_name == "lambdas" else 1
        if not v or any(not 0 < x <= high for x in v):
            raise OsrmInputError(f"{info.field_name} must be a non-empty list of numbers in (0, {high}]")
        return v


def parse_values(text: str) -> list:
    """Comma-separated values of a sweep list (command line, app): numbers where they parse,
    else the words (``"total, frequency"`` -> ``["total", "frequency"]``)."""
    out: list = []
    for x in text.replace(";", ",").split(","):
        if x.strip():
            try:
                out.append(float(x))
            except ValueError:
                out.append(x.strip())
    return out


def check_init_params(given: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every option of every init that has some: the ``given`` values (checked against each
    init's :class:`~osrm_core.params.ParamSpec`) and the defaults of the rest, so that two
    configs that mean the same are equal."""
    from osrm_core.inits import INITS

    with_params = [n for n, m in INITS.items() if m.params]
    for init, values in given.items():
        if init not in with_params:
            raise OsrmInputError(f"{init}: no init {init!r} with options; "
                                 f"inits with options: {', '.join(with_params) or 'none'}")
        names = [spec.name for spec in INITS[init].params]
        if not isinstance(values, dict) or any(k not in names for k in values):
            raise OsrmInputError(f"{init} must map option names to values; "
                                 f"the options of {init} are {', '.join(names)}")
    return {init: {spec.name: spec.check(given.get(init, {}).get(spec.name, spec.default),
                                         f"{init}.{spec.name}") for spec in INITS[init].params}
            for init in with_params}


STATS_SETTINGS = ("model", "tasks", "samples", "max_length", "seed", "target_modules", "stats_dtype",
                  "layers_per_pass")


class RunConfig(BaseModel):
    """A whole experiment; written as ``config.yaml`` (the app and the command line share it)."""

    model_config = ConfigDict(extra="forbid")
    name: str = "run"
    model: str | None = Field(None, description="Hugging Face id or local path; None: packaged MiniLM")
    tasks: list[TaskEntry]
    rank: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    target_modules: list[str] | None = None
    samples: int = Field(100, ge=1, description="examples per task for the feature statistics")
    max_length: int = Field(128, ge=2)
    max_test: int | None = Field(None, ge=1)
    inits: list[InitName] = Field(default_factory=lambda: ["standard", "osrm"])
    a_scale: float = Field(1.0, gt=0)
    osrm_weighting: Literal["equal", "tokens"] = "equal"
    init_params: dict[str, dict[str, Any]] = Field(
        default_factory=dict, validate_default=True, description="options of the inits that have some, by init, e.g. "
        "{osrm_gen: {eps: 0.01}}; an option not given keeps its default (see each init's params)"
    )
    train: TrainSettings = Field(default_factory=TrainSettings)
    per_init: dict[InitName, InitSettings] = Field(
        default_factory=dict, description="settings of one init's adapters that differ from the run's, by init"
    )
    merge: MergeSettings = Field(default_factory=MergeSettings)
    seed: int = 0
    device: str = "cpu"
    device_map: str | None = Field(
        None, description="'auto' spreads a model too large for one device over all of them"
    )
    stats_dtype: Literal["float64", "float32"] = Field(
        "float64", description="accumulation dtype of the feature statistics (float32 halves their memory)"
    )
    layers_per_pass: int | None = Field(
        None, ge=1, description="collect statistics this many layer inputs per pass, each written to disk when done"
    )

    @model_validator(mode="before")
    @classmethod
    def _old_init_options(cls, data: Any) -> Any:
        """A config written before ``init_params`` set osrm_gen's eps as ``osrm_gen_eps``."""
        if isinstance(data, dict) and "osrm_gen_eps" in data:
            data = dict(data)
            eps = data.pop("osrm_gen_eps")
            given = dict((data.get("init_params") or {}).get("osrm_gen") or {})
            if "eps" in given and given["eps"] != eps:
                raise OsrmInputError("osrm_gen_eps and init_params.osrm_gen.eps differ: give init_params only")
            data["init_params"] = {**(data.get("init_params") or {}), "osrm_gen": {**given, "eps": eps}}
        return data

    @field_validator("init_params")
    @classmethod
    def _init_params(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return check_init_params(v)

    @field_validator("inits")
    @classmethod
    def _inits(cls, v: list[str]) -> list[str]:
        if not v:
            raise OsrmInputError("at least one init is needed")
        return v

    @model_validator(mode="after")
    def _tasks(self) -> RunConfig:
        names = [t.name for t in self.tasks]
        if len(names) < 2:
            raise OsrmInputError("at least two tasks are needed to merge")
        if len(set(names)) != len(names):
            raise OsrmInputError(f"task names must be unique, got {names}")
        for init in self.per_init:
            if init not in self.inits:
                raise OsrmInputError(f"per_init.{init}: {init!r} is not one of the run's inits ({', '.join(self.inits)})")
        for init in self.inits:
            own = self.per_init.get(init)
            field = f"per_init.{init}.constraint" if own and own.constraint else "train.constraint"
            check_constraint(self.for_init(init).train.constraint, [init], field=field)
        return self

    def for_init(self, init: str) -> RunConfig:
        """The settings ``init``'s adapters are initialized and trained with: this run's, with
        ``per_init[init]`` in place of the run's rank, alpha, constraint, lr and A's lr scale."""
        own = self.per_init.get(init, InitSettings())
        train = {k: v for k, v in own.model_dump(include={"constraint", "lr", "a_lr_scale"}).items() if v is not None}
        return self.model_copy(update={
            "inits": [init],
            "per_init": {},
            "rank": own.rank or self.rank,
            "alpha": own.alpha or self.alpha,
            "train": self.train.model_copy(update=train),
        })

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        return cls.validate_dict(*read_yaml(path, "config file"))

    @classmethod
    def validate_dict(cls, data, where: str = "config") -> RunConfig:
        return validate_settings(cls, data, where)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def stats_key(self) -> str:
        """The settings the feature statistics depend on: runs with equal keys collect equal ones."""
        return json.dumps(self.model_dump(mode="json", include=set(STATS_SETTINGS)), sort_keys=True)


#: The recipe that merged best at full length (reports/long-training, three seeds): osrm_gen with
#: A frozen in its subspace at rank 32 (only B learns); the demo compares it with standard LoRA.
MERGE_READY = ("osrm_gen", InitSettings(rank=32, constraint="freeze_A"))


def demo_config(quick: bool = False) -> RunConfig:
    """The embedded default: packaged MiniLM and the four built-in demo tasks; standard LoRA
    (rank 8) against the merge-ready recipe (:data:`MERGE_READY`)."""
    from osrm_core.demo import DEMO_TASKS

    tasks = [TaskEntry(name=k, spec=f"demo:{k}") for k in DEMO_TASKS]
    # Lambdas past 1: TIES and RegMean average the deltas, and an adapter that learned less (A
    # frozen) peaks later; a best point at the grid's edge would hide both.
    if quick:
        name, samples, max_length, steps = "demo-quick", 64, 48, 80
        merge = MergeSettings(methods=["task_arithmetic", "ties"], lambdas=[0.3, 0.6, 1.0, 1.5, 2.0, 3.0])
    else:
        name, samples, max_length, steps = "demo", 100, 64, 200
        merge = MergeSettings(methods=["task_arithmetic", "ties", "dare_linear", "regmean", "knots_ta"],
                              lambdas=[0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0])
    init, recipe = MERGE_READY
    return RunConfig(name=name, tasks=tasks, samples=samples, max_length=max_length, max_test=200,
                     inits=["standard", init], per_init={init: recipe},
                     train=TrainSettings(steps=steps, batch_size=16, lr=2e-3, head_lr=1e-2), merge=merge)


def merge_ready_config() -> RunConfig:
    """The merge-ready recipe alone (reports/long-training: three seeds, +8.2 points of plain
    merged average over standard LoRA with task arithmetic and TIES) at the study's length:
    1,000 steps on the four demo tasks."""
    demo = demo_config().for_init(MERGE_READY[0])
    return demo.model_copy(update={
        "name": "merge-ready",
        "train": demo.train.model_copy(update={"steps": 1000}),
        "merge": MergeSettings(methods=["task_arithmetic", "ties", "regmean"], lambdas=demo.merge.lambdas),
    })
