"""Run directories and the end-to-end experiment: statistics, init + fine-tuning per init and
task, merge sweeps, diagnostics and a summary.

Layout (see DESIGN.md)::

    runs/<name>/config.yaml        what was asked
    runs/<name>/manifest.json      versions, timings and the state of each stage
    runs/<name>/stats/<task>.safetensors
    runs/<name>/adapters/<init>/<task>/   adapter_config.json, adapter_model.safetensors, train.json
    runs/<name>/results/*.csv, results/summary.json

Every file is written atomically and each unit of work (one task's statistics, one adapter,
one init's sweep) is recorded in the manifest when it is done, so an interrupted run resumes
where it stopped and gives the same results.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from osrm_core.adapters import Adapter, read_adapter_dir
from osrm_core.atomic import atomic_path, write_json, write_text
from osrm_core.data import TaskData, parse_task_spec
from osrm_core.distributed import (
    barrier,
    broadcast_object,
    dist_info,
    is_main_process,
    local_device,
    run_on_main,
)
from osrm_core.init import INIT_METHODS, OSRM_METHODS, init_lora, rest_moment, task_subspaces
from osrm_core.stats import FeatureStats, collect_feature_stats, write_feature_stats
from osrm_core.train import TrainConfig, adapter_of, finetune, save_adapter

Progress = Callable[[int, int, str], None]
DEFAULT_LAMBDAS = [round(0.1 * i, 1) for i in range(1, 11)]


class ConfigError(ValueError):
    """The run configuration is invalid; the message names the field."""


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
        loc = ".".join(str(x) for x in e["loc"]) or "config"
        raise ConfigError(f"{where}: {loc}: {e['msg']}") from None


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


class TrainSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-4, gt=0)
    head_lr: float | None = Field(None, gt=0)
    a_lr_scale: float = Field(1.0, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    constraint: Literal["none", "freeze_A", "project", "penalty"] = "none"
    penalty_beta: float = Field(1e-3, ge=0)


class MergeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    methods: list[str] = Field(default_factory=lambda: ["task_arithmetic", "ties"])
    lambdas: list[float] = Field(default_factory=lambda: list(DEFAULT_LAMBDAS))
    densities: list[float] = Field(default_factory=lambda: [0.5])

    @field_validator("methods")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from osrm_core.merge import MERGE_METHODS

        for m in v:
            if m not in MERGE_METHODS:
                raise ValueError(f"unknown merge method {m!r}; known: {', '.join(MERGE_METHODS)}")
        if not v:
            raise ValueError("at least one merge method is needed")
        return v

    @field_validator("lambdas")
    @classmethod
    def _lambdas(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < x <= 10 for x in v):
            raise ValueError("lambdas must be a non-empty list of numbers in (0, 10]")
        return v

    @field_validator("densities")
    @classmethod
    def _densities(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < x <= 1 for x in v):
            raise ValueError("densities must be a non-empty list of numbers in (0, 1]")
        return v


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
    inits: list[str] = Field(default_factory=lambda: ["standard", "osrm"])
    a_scale: float = Field(1.0, gt=0)
    osrm_weighting: Literal["equal", "tokens"] = "equal"
    train: TrainSettings = Field(default_factory=TrainSettings)
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

    @field_validator("inits")
    @classmethod
    def _inits(cls, v: list[str]) -> list[str]:
        for m in v:
            if m not in INIT_METHODS:
                raise ValueError(f"unknown init {m!r}; allowed: {', '.join(INIT_METHODS)}")
        if not v:
            raise ValueError("at least one init is needed")
        return v

    @model_validator(mode="after")
    def _tasks(self) -> RunConfig:
        names = [t.name for t in self.tasks]
        if len(names) < 2:
            raise ValueError("at least two tasks are needed to merge")
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        return self

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

    def train_config(self, seed: int | None = None) -> TrainConfig:
        t = self.train
        return TrainConfig(
            steps=t.steps,
            batch_size=t.batch_size,
            lr=t.lr,
            head_lr=t.head_lr,
            a_lr_scale=t.a_lr_scale,
            warmup_ratio=t.warmup_ratio,
            max_grad_norm=t.max_grad_norm,
            max_length=self.max_length,
            seed=self.seed if seed is None else seed,
            constraint=t.constraint,
            penalty_beta=t.penalty_beta,
            max_test=self.max_test,
        )


def demo_config(quick: bool = False) -> RunConfig:
    """The embedded default: packaged MiniLM and the four built-in demo tasks."""
    from osrm_core.demo import DEMO_TASKS

    tasks = [TaskEntry(name=k, spec=f"demo:{k}") for k in DEMO_TASKS]
    if quick:
        return RunConfig(
            name="demo-quick",
            tasks=tasks,
            samples=64,
            max_length=48,
            max_test=200,
            train=TrainSettings(steps=80, batch_size=16, lr=2e-3, head_lr=1e-2),
            merge=MergeSettings(methods=["task_arithmetic", "ties"], lambdas=[0.3, 0.5, 0.7, 1.0]),
        )
    return RunConfig(
        name="demo",
        tasks=tasks,
        samples=100,
        max_length=64,
        max_test=200,
        train=TrainSettings(steps=200, batch_size=16, lr=2e-3, head_lr=1e-2),
        merge=MergeSettings(methods=["task_arithmetic", "ties", "dare_linear", "regmean", "knots_ta"]),
    )


# --------------------------------------------------------------------------- run directory


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


class RunDir:
    """A run directory: its config, manifest and files."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # paths
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def stats_path(self, task: str) -> Path:
        return self.path / "stats" / f"{task}.safetensors"

    def stats_dir(self, task: str) -> Path:
        """Statistics written one pass at a time (``layers_per_pass``): ``part-NNNN.safetensors``."""
        return self.path / "stats" / task

    def has_stats(self, task: str) -> bool:
        return self.stats_path(task).is_file() or any(self.stats_dir(task).glob("part-*.safetensors"))

    def adapter_path(self, init: str, task: str) -> Path:
        return self.path / "adapters" / init / task

    def result_path(self, name: str) -> Path:
        return self.path / "results" / name

    # state
    def exists(self) -> bool:
        return self.config_path.is_file()

    def config(self) -> RunConfig:
        return RunConfig.from_yaml(self.config_path)

    def manifest(self) -> dict:
        if not self.manifest_path.is_file():
            return {"stages": {}}
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise ConfigError(f"{self.manifest_path}: damaged manifest") from None

    def is_done(self, key: str) -> bool:
        return self.manifest()["stages"].get(key, {}).get("status") == "done"

    def mark_done(self, key: str, seconds: float, files: list[Path] = ()) -> None:
        manifest = self.manifest()
        manifest["stages"][key] = {
            "status": "done",
            "seconds": round(seconds, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "files": {str(f.relative_to(self.path)): _sha(f) for f in files if f.is_file()},
        }
        write_json(self.manifest_path, manifest)

    def create(self, config: RunConfig) -> None:
        """Write ``config.yaml`` (or check it matches an existing run) and a fresh manifest."""
        if self.exists():
            old = self.config()
            if old.model_dump() != config.model_dump():
                raise ConfigError(
                    f"run directory {str(self.path)!r} holds a run with another config; "
                    "use another --out or delete it"
                )
            self.remove_partial_files()
            return
        self.path.mkdir(parents=True, exist_ok=True)
        write_text(self.config_path, config.to_yaml())
        import peft
        import transformers

        write_json(
            self.manifest_path,
            {
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "versions": {
                    "osrm_core": __import__("osrm_core").__version__,
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "peft": peft.__version__,
                    "python": platform.python_version(),
                },
                "stages": {},
            },
        )

    def remove_partial_files(self) -> list[Path]:
        """Delete the half-written temporary files (``.NAME.XXXX.tmp``, see
        :func:`osrm_core.atomic.atomic_path`) that a killed process leaves behind.

        Called when a run resumes; one process writes a run directory at a time.
        """
        removed = [p for p in self.path.rglob(".*.tmp") if p.is_file()]
        for p in removed:
            p.unlink(missing_ok=True)
        return removed

    # reading results
    def load_stats(self) -> dict[str, FeatureStats]:
        root = self.path / "stats"
        found = {p.stem: p for p in root.glob("*.safetensors")}
        found.update({p.name: p for p in root.glob("*") if p.is_dir() and any(p.glob("part-*.safetensors"))})
        return {name: FeatureStats.load(found[name]) for name in sorted(found)}

    def load_adapters(self, init: str) -> dict[str, Adapter]:
        root = self.path / "adapters" / init
        return {p.name: read_adapter_dir(p) for p in sorted(root.iterdir()) if p.is_dir()} if root.is_dir() else {}

    def inits(self) -> list[str]:
        root = self.path / "adapters"
        return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []

    def read_csv(self, name: str) -> pd.DataFrame | None:
        p = self.result_path(name)
        return pd.read_csv(p) if p.is_file() else None

    def summary(self) -> dict | None:
        p = self.result_path("summary.json")
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None


def write_csv(path: Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


# --------------------------------------------------------------------------- pipeline


def _load_entry(entry: TaskEntry, seed: int) -> TaskData:
    """The task a config entry names; column names apply to files only."""
    if entry.spec.startswith(("demo:", "hf:")):
        return parse_task_spec(entry.spec, name=entry.name, seed=seed, metric=entry.metric)
    columns = {"text": entry.text, "label": entry.label, "text_pair": entry.text_pair}
    return parse_task_spec(entry.spec, name=entry.name, seed=seed, metric=entry.metric, **columns)


class Pipeline:
    """Runs the stages of a :class:`RunConfig` into a :class:`RunDir`, resuming finished work.

    Parameters
    ----------
    progress : callable (step, total, message), optional
        Called with the progress of the current stage; ``stage`` callback gets stage names.
    """

    def __init__(
        self,
        config: RunConfig,
        run_dir: str | Path,
        *,
        progress: Progress | None = None,
        on_stage: Callable[[str], None] | None = None,
        tasks: list[TaskData] | None = None,
    ) -> None:
        self.config = config
        self.run = RunDir(run_dir)
        self.progress = progress
        self.on_stage = on_stage or (lambda s: None)
        self._tasks = tasks
        self._models: dict[int, tuple] = {}

    # ---- inputs
    def tasks(self) -> list[TaskData]:
        if self._tasks is None:
            self._tasks = [_load_entry(t, self.config.seed) for t in self.config.tasks]
        return self._tasks

    def base_model(self, num_labels: int = 2):
        """A fresh copy of the base model with a ``num_labels`` head (loaded once per size).

        With ``device_map`` the model is loaded anew each time instead (a copy of a large model
        would double its memory). In a data-parallel job each process uses its own GPU.
        """
        from osrm_core.models import load_base_model

        device = local_device(self.config.device)
        if self.config.device_map is not None:
            if dist_info().active:
                raise ValueError(
                    "device_map spreads one model over all devices, so it needs one process: launch "
                    "without torchrun, or drop device_map and set device: cuda (one GPU per process)"
                )
            return load_base_model(self.config.model, num_labels=num_labels, device_map=self.config.device_map)
        if num_labels not in self._models:
            self._models[num_labels] = load_base_model(self.config.model, num_labels=num_labels, device=device)
        model, tokenizer = self._models[num_labels]
        fresh = copy.deepcopy(model)
        fresh.name_or_path_ = model.name_or_path_
        return fresh, tokenizer

    # ---- stages
    def trainable_tasks(self) -> list[TaskData]:
        """The tasks, all labelled (else ValueError): fine-tuning and sweeps need labels."""
        tasks = self.tasks()
        unlabeled = [t.name for t in tasks if not t.labeled]
        if unlabeled:
            raise ValueError(
                f"task {unlabeled[0]!r} has no labels; fine-tuning needs labelled data (plain texts serve "
                "osrm stats and osrm diagnose)"
            )
        return tasks

    def run_all(self) -> dict:
        """Every stage. In a data-parallel job (torchrun, accelerate launch) all ranks share the
        statistics and the fine-tuning; rank 0 alone writes the run directory, then runs the
        sweeps, diagnostics and summary while the other ranks return an empty dict."""
        self.trainable_tasks()  # before any work
        run_on_main(lambda: self.run.create(self.config), "creating the run directory")
        self.stage_stats()
        for init in self.config.inits:
            self.stage_adapters(init)
        if not is_main_process():
            return {}
        for init in self.config.inits:
            self.stage_sweep(init)
        self.stage_diagnostics()
        return self.stage_summary()

    def reuse_stats(self, source: RunDir) -> list[str]:
        """Copy the finished statistics of ``source`` (a run with the same
        :meth:`RunConfig.stats_key`) instead of collecting them again; returns the tasks copied."""
        if source.config().stats_key() != self.config.stats_key():
            raise ValueError(f"run {str(source.path)!r} collected its statistics with other settings "
                             f"({', '.join(STATS_SETTINGS)} must match)")
        self.run.create(self.config)
        copied = []
        for task in self.config.tasks:
            key = f"stats/{task.name}"
            if self.run.is_done(key) or not (source.is_done(key) and source.has_stats(task.name)):
                continue
            if source.stats_dir(task.name).is_dir():
                shutil.copytree(source.stats_dir(task.name), self.run.stats_dir(task.name), dirs_exist_ok=True)
                files = sorted(self.run.stats_dir(task.name).glob("part-*.safetensors"))
            else:
                files = [self.run.stats_path(task.name)]
                files[0].parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source.stats_path(task.name), files[0])
            self.run.mark_done(key, 0.0, files)
            copied.append(task.name)
        return copied

    def _tick(self, step: int, total: int, message: str) -> None:
        if self.progress:
            self.progress(step, total, message)

    def _done(self, key: str, ready: Callable[[], bool]) -> bool:
        """Whether unit ``key`` is finished, as rank 0 sees it (every rank takes the same path)."""
        return broadcast_object(self.run.is_done(key) and ready() if is_main_process() else None, f"checking {key}")

    def stage_stats(self) -> dict[str, FeatureStats]:
        """Each task's statistics (data-parallel when launched so; rank 0 writes them).

        Returns the statistics of every task on rank 0 and an empty dict on the other ranks.
        """
        self.on_stage("statistics")
        cfg = self.config
        tasks = self.tasks()
        main = is_main_process()
        for i, task in enumerate(tasks):
            key = f"stats/{task.name}"
            if self._done(key, lambda t=task.name: self.run.has_stats(t)):
                continue
            start = time.perf_counter()
            model, tok = self.base_model()
            options = dict(
                target_modules=cfg.target_modules,
                max_samples=cfg.samples,
                max_length=cfg.max_length,
                seed=cfg.seed,
                dtype=getattr(torch, cfg.stats_dtype),
            )
            if cfg.layers_per_pass is not None:
                folder = write_feature_stats(
                    model, tok, task, self.run.stats_dir(task.name), layers_per_pass=cfg.layers_per_pass, **options
                )
                files = sorted(folder.glob("part-*.safetensors"))
            else:
                stats = collect_feature_stats(model, tok, task, **options)
                files = [self.run.stats_path(task.name)]
                if main:
                    stats.save(files[0])
                del stats
            del model
            if main:
                self.run.mark_done(key, time.perf_counter() - start, files)
            barrier(f"writing the statistics of {task.name!r}")
            self._tick(i + 1, len(tasks), f"statistics {task.name}")
        return self.run.load_stats() if main else {}

    def stage_adapters(self, init: str) -> None:
        """Initialize and fine-tune one adapter per task (data-parallel when launched so)."""
        self.on_stage(f"fine-tuning ({init})")
        tasks = self.trainable_tasks()
        for i, task in enumerate(tasks):
            key = f"adapters/{init}/{task.name}"
            out = self.run.adapter_path(init, task.name)
            if self._done(key, lambda o=out: (o / "adapter_model.safetensors").is_file()):
                continue
            start = time.perf_counter()
            result = self._train_one(init, i, task)
            if is_main_process():
                write_json(out / "train.json", result)
                self.run.mark_done(
                    key, time.perf_counter() - start, [out / "adapter_model.safetensors", out / "train.json"]
                )
            barrier(f"writing the adapter {init}/{task.name}")

    def all_stats(self) -> list[FeatureStats]:
        """Every task's statistics from the run directory, in task order."""
        loaded = self.run.load_stats()
        missing = [t.name for t in self.tasks() if t.name not in loaded]
        if missing:
            raise ValueError(f"run {str(self.run.path)!r} has no statistics of task {missing[0]!r}; run osrm stats")
        return [loaded[t.name] for t in self.tasks()]

    def _init_one(self, init: str, index: int, task: TaskData, all_stats: list[FeatureStats] | None = None):
        """A fresh base model wrapped in LoRA initialized by ``init``, and the OSRM subspaces.

        The subspaces are decomposed on each layer's device; in a data-parallel job rank 0
        computes them and hands them to the others, so every rank starts from the same ``A``.
        """
        from osrm_core.models import layer_devices

        cfg = self.config
        model, tok = self.base_model(task.num_labels)
        subspaces = None
        if init in OSRM_METHODS:

            def compute() -> dict[str, torch.Tensor]:
                stats = all_stats if all_stats is not None else self.all_stats()
                devices = layer_devices(model, list(stats[index].layers))
                sub = task_subspaces(init, stats, index, cfg.rank, weighting=cfg.osrm_weighting, device=devices)
                return {n: a.cpu() for n, a in sub.items()} if dist_info().active else sub

            subspaces = run_on_main(compute, f"OSRM subspaces of {task.name!r}")
        eva_batches = None
        if init == "eva":
            from osrm_core.batching import iter_batches
            from osrm_core.stats import select_samples

            idx = select_samples(len(task.train), cfg.samples, cfg.seed)
            eva_batches = list(
                iter_batches(tok, task.train, batch_size=16, max_length=cfg.max_length, indices=idx, with_labels=False)
            )
        peft_model = init_lora(
            model,
            init,
            rank=cfg.rank,
            alpha=cfg.alpha,
            target_modules=cfg.target_modules,
            subspaces=subspaces,
            eva_batches=eva_batches,
            a_scale=cfg.a_scale,
            seed=cfg.seed,
        )
        return peft_model, tok, subspaces

    def _train_one(self, init: str, index: int, task: TaskData, all_stats: list[FeatureStats] | None = None) -> dict:
        cfg = self.config
        peft_model, tok, subspaces = self._init_one(init, index, task, all_stats)
        initial = adapter_of(peft_model) if init == "pissa" else None
        train_cfg = cfg.train_config()
        if init not in OSRM_METHODS and train_cfg.constraint in ("project", "penalty", "freeze_A"):
            # Constraints refer to the OSRM subspace; baselines train unconstrained for comparison.
            train_cfg.constraint = "none"
        penalty_moments = None
        if train_cfg.constraint == "penalty":
            stats = all_stats if all_stats is not None else self.all_stats()
            penalty_moments = rest_moment([s for j, s in enumerate(stats) if j != index])
        result = finetune(
            peft_model,
            tok,
            task,
            train_cfg,
            subspaces=subspaces,
            penalty_moments=penalty_moments,
            progress=self.progress,
        )
        if is_main_process():
            save_adapter(adapter_of(peft_model, initial), self.run.adapter_path(init, task.name))
        return {**result.to_dict(), "init": init, "losses": result.losses[-20:]}

    def stage_sweep(self, init: str) -> pd.DataFrame:
        self.on_stage(f"merge sweep ({init})")
        key = f"sweep/{init}"
        path = self.run.result_path(f"sweep_{init}.csv")
        if self.run.is_done(key) and path.is_file():
            return pd.read_csv(path)
        from osrm_core.evaluate import SweepEngine

        start = time.perf_counter()
        tasks = self.tasks()
        adapters = self.run.load_adapters(init)
        model, tok = self.base_model()
        engine = SweepEngine(model, tok, tasks, adapters, max_test=self.config.max_test, max_length=self.config.max_length)
        single = engine.single_task_scores()
        df = engine.sweep(
            self.config.merge.methods,
            self.config.merge.lambdas,
            densities=self.config.merge.densities,
            stats=self.run.load_stats(),
            single=single,
            seed=self.config.seed,
            progress=self.progress,
        )
        df.insert(0, "init", init)
        write_csv(path, df)
        self.run.mark_done(key, time.perf_counter() - start, [path])
        return df

    def stage_diagnostics(self) -> None:
        self.on_stage("diagnostics")
        from osrm_core.diagnostics import angle_table, interference_table, own_energy_table
        from osrm_core.models import weight_as_linear

        key = "diagnostics"
        files = [
            self.run.result_path("interference.csv"),
            self.run.result_path("own_energy.csv"),
            self.run.result_path("angles.csv"),
        ]
        if self.run.is_done(key) and all(f.is_file() for f in files):
            return
        start = time.perf_counter()
        stats = self.run.load_stats()
        model, _ = self.base_model()
        frames, own, angles = [], [], []
        for init in self.config.inits:
            adapters = self.run.load_adapters(init)
            w0 = {n: weight_as_linear(model.get_submodule(n)).detach() for n in next(iter(adapters.values())).layers}
            frames.append(interference_table(adapters, stats, w0).assign(init=init))
            own.append(own_energy_table(adapters, stats).assign(init=init))
            angles.append(angle_table(stats, k=self.config.rank, adapters=adapters).assign(init=init))
        for f, df in zip(files, (frames, own, angles)):
            write_csv(f, pd.concat(df, ignore_index=True))
        self.run.mark_done(key, time.perf_counter() - start, files)

    def stage_summary(self) -> dict:
        summary = build_summary(self.run, [t.name for t in self.tasks()], self.config.inits)
        write_json(self.run.result_path("summary.json"), summary)
        manifest = self.run.manifest()
        manifest["status"] = "done"
        write_json(self.run.manifest_path, manifest)
        self.on_stage("done")
        return summary


def init_adapters(pipeline: Pipeline, init: str) -> list[str]:
    """Write each task's initialized, untrained adapter to ``<run>/init/<init>/<task>``.

    The statistics are collected data-parallel when launched so; the initialization itself is
    cheap and runs on rank 0 alone (the other ranks return an empty list).
    """
    pipeline.stage_stats()
    if not is_main_process():
        return []
    all_stats = pipeline.all_stats()
    written = []
    for i, task in enumerate(pipeline.tasks()):
        peft_model, _, _ = pipeline._init_one(init, i, task, all_stats)
        out = pipeline.run.path / "init" / init / task.name
        save_adapter(adapter_of(peft_model), out)
        written.append(str(out))
    return written


def _rounded(x: float) -> float | None:
    """Rounded for JSON; NaN (no valid normalized score) becomes None."""
    return None if pd.isna(x) else round(float(x), 4)


def build_summary(run: RunDir, task_names: list[str], inits: list[str]) -> dict:
    """``tasks``, ``inits`` and per init ``single`` scores and ``merged`` sweep points per method,
    with the best point per method."""
    out: dict = {"tasks": task_names, "inits": inits, "results": {}}
    for init in inits:
        df = run.read_csv(f"sweep_{init}.csv")
        if df is None:
            continue
        single = df.drop_duplicates("task").set_index("task")["single"].to_dict()
        merged: dict[str, list] = {}
        best: dict[str, dict] = {}
        for (method, density, lam), g in df.groupby(["method", "density", "lambda"], dropna=False):
            point = {
                "lambda": float(lam),
                "density": None if pd.isna(density) else float(density),
                "scores": g.set_index("task")["score"].round(4).to_dict(),
                "normalized_avg": _rounded(g["normalized"].mean()),
                "avg": round(float(g["score"].mean()), 4),
            }
            merged.setdefault(method, []).append(point)
            if point["normalized_avg"] is not None and (
                method not in best or point["normalized_avg"] > best[method]["normalized_avg"]
            ):
                best[method] = point
        out["results"][init] = {"single": single, "merged": merged, "best": best}
    return out


def run_experiment(
    config: RunConfig,
    out: str | Path,
    *,
    progress: Progress | None = None,
    on_stage: Callable[[str], None] | None = None,
    tasks: list[TaskData] | None = None,
) -> dict:
    """Run (or resume) the whole experiment of ``config`` in ``out``; returns the summary."""
    return Pipeline(config, out, progress=progress, on_stage=on_stage, tasks=tasks).run_all()
