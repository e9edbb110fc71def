"""The pipeline: statistics, init + fine-tuning per init and task, merge sweeps, diagnostics
and a summary, each stage reading and writing a :class:`~osrm_core.rundir.RunDir`.

The public entry points are one per command: :meth:`Pipeline.run_all` (``osrm run``),
:meth:`Pipeline.collect_stats` (``osrm stats``), :meth:`Pipeline.write_inits` (``osrm init``)
and :meth:`Pipeline.train_adapters` (``osrm train``); finished units of work are skipped, so
an interrupted run resumes.
"""

from __future__ import annotations

import copy
import functools
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch

from osrm_core.atomic import write_json
from osrm_core.constraints import get_constraint
from osrm_core.data import TaskData
from osrm_core.distributed import (
    barrier,
    broadcast_object,
    dist_info,
    is_main_process,
    local_device,
    run_on_main,
)
from osrm_core.errors import OsrmInputError
from osrm_core.inits import get_init, init_lora, rest_moment, task_subspaces
from osrm_core.lock import DirLock
from osrm_core.rundir import RunDir, write_csv
from osrm_core.settings import STATS_SETTINGS, RunConfig, TaskEntry
from osrm_core.stats import FeatureStats, collect_feature_stats, write_feature_stats
from osrm_core.summary import build_summary
from osrm_core.task_spec import parse_task_spec
from osrm_core.train import adapter_of, finetune, save_adapter

Progress = Callable[[int, int, str], None]


def _load_entry(entry: TaskEntry, seed: int) -> TaskData:
    """The task a config entry names; column names apply to files only."""
    if entry.spec.startswith(("demo:", "hf:")):
        return parse_task_spec(entry.spec, name=entry.name, seed=seed, metric=entry.metric)
    columns = {"text": entry.text, "label": entry.label, "text_pair": entry.text_pair}
    return parse_task_spec(entry.spec, name=entry.name, seed=seed, metric=entry.metric, **columns)


def _holding_lock(method):
    """Run a :class:`Pipeline` workflow holding its run directory's lock (:meth:`Pipeline.locked`)."""

    @functools.wraps(method)
    def locked_method(self, *args, **kwargs):
        with self.locked():
            return method(self, *args, **kwargs)

    return locked_method


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
                raise OsrmInputError(
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

    @contextmanager
    def locked(self) -> Iterator[Pipeline]:
        """Hold the run directory's lock (:class:`osrm_core.lock.DirLock`) while writing it.

        Every workflow below takes it (again, harmlessly, when the caller holds it already); a
        second writer gets :class:`osrm_core.lock.LockedError` naming the holder. In a
        data-parallel job rank 0 (the only writer) takes it and every rank stops if it is held.
        """
        lock = DirLock(self.run.path)
        run_on_main(lock.acquire, f"locking {str(self.run.path)!r}")
        try:
            yield self
        finally:
            if is_main_process():
                lock.release()

    # ---- stages
    def trainable_tasks(self) -> list[TaskData]:
        """The tasks, all labelled (else ValueError): fine-tuning and sweeps need labels."""
        tasks = self.tasks()
        unlabeled = [t.name for t in tasks if not t.labeled]
        if unlabeled:
            raise OsrmInputError(
                f"task {unlabeled[0]!r} has no labels; fine-tuning needs labelled data (plain texts serve "
                "osrm stats and osrm diagnose)"
            )
        return tasks

    @_holding_lock
    def run_all(self, jobs: int = 1) -> dict:
        """Every stage. In a data-parallel job (torchrun, accelerate launch) all ranks share the
        statistics and the fine-tuning; rank 0 alone writes the run directory, then runs the
        sweeps, diagnostics and summary while the other ranks return an empty dict. Otherwise
        ``jobs > 1`` fine-tunes the adapters (one per init and task) in that many processes."""
        if not self.train_adapters(jobs):
            return {}
        for init in self.config.inits:
            self.stage_sweep(init)
        self.stage_diagnostics()
        return self.stage_summary()

    def create(self) -> None:
        """Write the run directory's config and manifest (rank 0), or check an existing one matches."""
        run_on_main(lambda: self.run.create(self.config), "creating the run directory")

    @_holding_lock
    def collect_stats(self) -> dict[str, FeatureStats]:
        """The statistics stage alone (``osrm stats``): every task's statistics on rank 0."""
        self.create()
        return self.stage_stats()

    @_holding_lock
    def write_inits(self) -> dict[str, list[str]]:
        """Each init's initialized, untrained adapter per task in ``<run>/init/<init>/<task>``
        (``osrm init``). The statistics are collected data-parallel when launched so; the
        initialization itself is cheap and runs on rank 0 alone (the others get an empty dict)."""
        self.create()
        self.stage_stats()
        if not is_main_process():
            return {}
        all_stats = self.all_stats()
        written: dict[str, list[str]] = {}
        for init in self.config.inits:
            for i, task in enumerate(self.tasks()):
                peft_model, _, _ = self.init_adapter(init, i, task, all_stats)
                out = self.run.path / "init" / init / task.name
                save_adapter(adapter_of(peft_model), out)
                written.setdefault(init, []).append(str(out))
        return written

    @_holding_lock
    def train_adapters(self, jobs: int = 1) -> dict[str, dict[str, float]]:
        """Statistics and fine-tuning for every init (``osrm train``): the test score per init and
        task on rank 0 (the other ranks of a data-parallel job get an empty dict). Every rank
        takes part in the statistics and the fine-tuning. ``jobs > 1`` (one process only)
        fine-tunes in that many processes, see :meth:`train_parallel`."""
        from osrm_core.parallel import threads_per_job

        threads_per_job(jobs)
        self.trainable_tasks()  # before any work
        if jobs > 1 and dist_info().active:
            raise OsrmInputError("jobs > 1 splits one machine's cores between processes; a data-parallel "
                             "job (torchrun, accelerate launch) already has one per device: drop --jobs")
        self.create()
        self.stage_stats()
        if jobs > 1:
            self.train_parallel(jobs)
        for init in self.config.inits:
            self.stage_adapters(init)
        if not is_main_process():
            return {}
        return {
            init: {t.name: self.run.train_result(init, t.name)["test_score"] for t in self.config.tasks}
            for init in self.config.inits
        }

    @_holding_lock
    def reuse_stats(self, source: RunDir) -> list[str]:
        """Copy the finished statistics of ``source`` (a run with the same
        :meth:`RunConfig.stats_key`) instead of collecting them again; returns the tasks copied."""
        if source.config().stats_key() != self.config.stats_key():
            raise OsrmInputError(f"run {str(source.path)!r} collected its statistics with other settings "
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
            result = self.train_adapter(init, i, task)
            if is_main_process():
                write_json(out / "train.json", result)
                self.run.mark_done(
                    key, time.perf_counter() - start, [out / "adapter_model.safetensors", out / "train.json"]
                )
            barrier(f"writing the adapter {init}/{task.name}")

    def train_parallel(self, jobs: int) -> None:
        """Fine-tune the adapters not yet done in ``jobs`` processes (the statistics must be in
        place); this process records each one in the manifest as it finishes."""
        from osrm_core.parallel import run_parallel

        units = [(self.config, self.run.path, self.tasks(), init, i)
                 for init in self.config.inits for i, task in enumerate(self.tasks())
                 if not self.run.is_done(f"adapters/{init}/{task.name}")]

        def done(k: int, trained: tuple[str, str, float, dict]) -> None:
            init, name, seconds, result = trained
            out = self.run.adapter_path(init, name)
            write_json(out / "train.json", result)
            self.run.mark_done(f"adapters/{init}/{name}", seconds,
                               [out / "adapter_model.safetensors", out / "train.json"])
            self._tick(k + 1, len(units), f"fine-tuned {init}/{name}")

        run_parallel(_train_unit, units, jobs, on_done=done)

    def all_stats(self) -> list[FeatureStats]:
        """Every task's statistics from the run directory, in task order."""
        loaded = self.run.load_stats()
        missing = [t.name for t in self.tasks() if t.name not in loaded]
        if missing:
            raise OsrmInputError(f"run {str(self.run.path)!r} has no statistics of task {missing[0]!r}; run osrm stats")
        return [loaded[t.name] for t in self.tasks()]

    def init_adapter(self, init: str, index: int, task: TaskData, all_stats: list[FeatureStats] | None = None):
        """A fresh base model wrapped in LoRA initialized by ``init``, and the OSRM subspaces.

        The subspaces are decomposed on each layer's device; in a data-parallel job rank 0
        computes them and hands them to the others, so every rank starts from the same ``A``.
        """
        from osrm_core.models import layer_devices

        cfg = self.config.for_init(init)
        spec = get_init(init)
        model, tok = self.base_model(task.num_labels)
        subspaces = None
        if spec.needs_stats:

            def compute() -> dict[str, torch.Tensor]:
                stats = all_stats if all_stats is not None else self.all_stats()
                devices = layer_devices(model, list(stats[index].layers))
                sub = task_subspaces(init, stats, index, cfg.rank, weighting=cfg.osrm_weighting, device=devices,
                                     **cfg.init_params.get(init, {}))
                return {n: a.cpu() for n, a in sub.items()} if dist_info().active else sub

            subspaces = run_on_main(compute, f"OSRM subspaces of {task.name!r}")
        eva_batches = None
        if spec.needs_data:
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

    def train_adapter(self, init: str, index: int, task: TaskData, all_stats: list[FeatureStats] | None = None) -> dict:
        """Initialize and fine-tune task ``index``'s adapter, save it (rank 0); returns what
        ``train.json`` holds."""
        cfg = self.config.for_init(init)
        peft_model, tok, subspaces = self.init_adapter(init, index, task, all_stats)
        initial = adapter_of(peft_model) if get_init(init).moves_base else None
        stats = all_stats if all_stats is not None else self.all_stats()
        penalty_moments = own_moments = None
        constraint = get_constraint(cfg.train.constraint)
        if constraint.needs_moments:
            penalty_moments = rest_moment([s for j, s in enumerate(stats) if j != index])
            if constraint.needs_own_moment:
                own_moments = {n: layer.second_moment for n, layer in stats[index].layers.items()}
        result = finetune(peft_model, tok, task, cfg.train, max_length=cfg.max_length, seed=cfg.seed,
                          max_test=cfg.max_test, subspaces=subspaces, penalty_moments=penalty_moments,
                          own_moments=own_moments, drift_stats={t.name: s for t, s in zip(self.tasks(), stats)},
                          progress=self.progress)
        if is_main_process():
            out = save_adapter(adapter_of(peft_model, initial), self.run.adapter_path(init, task.name))
            write_csv(out / "drift.csv", pd.DataFrame(result.drift))
        summary = {k: v for k, v in result.to_dict().items() if k != "drift"}
        return {**summary, "init": init, "losses": result.losses[-20:]}

    def sweep_engine(self, init: str):
        """A :class:`~osrm_core.evaluate.SweepEngine` on the base model with ``init``'s adapters,
        scoring on this run's tasks with its ``max_test`` and ``max_length``."""
        from osrm_core.evaluate import SweepEngine

        model, tok = self.base_model()
        return SweepEngine(model, tok, self.tasks(), self.run.load_adapters(init), max_test=self.config.max_test,
                           max_length=self.config.max_length)

    def stage_sweep(self, init: str) -> pd.DataFrame:
        self.on_stage(f"merge sweep ({init})")
        key = f"sweep/{init}"
        path = self.run.result_path(f"sweep_{init}.csv")
        if self.run.is_done(key) and path.is_file():
            return pd.read_csv(path)
        start = time.perf_counter()
        engine = self.sweep_engine(init)
        single = engine.single_task_scores()
        df = engine.sweep(
            self.config.merge.methods,
            self.config.merge.lambdas,
            densities=self.config.merge.densities,
            params=self.config.merge.params,
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
        from osrm_core.diagnostics import angle_rank, angle_table, interference_table, own_energy_table
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
            angles.append(angle_table(stats, k=angle_rank(adapters), adapters=adapters).assign(init=init))
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


def _train_unit(unit: tuple) -> tuple[str, str, float, dict]:
    """One adapter of :meth:`Pipeline.train_parallel`, in a worker process."""
    config, path, tasks, init, index = unit
    start = time.perf_counter()
    result = Pipeline(config, path, tasks=tasks).train_adapter(init, index, tasks[index])
    return init, tasks[index].name, time.perf_counter() - start, result


def run_experiment(config: RunConfig, out: str | Path, *, jobs: int = 1, **options) -> dict:
    """Run (or resume) the whole experiment of ``config`` in ``out``; returns the summary.
    ``options``: those of :class:`Pipeline` (``progress``, ``on_stage``, ``tasks``); ``jobs``
    processes fine-tune the adapters (see :meth:`Pipeline.run_all`)."""
    return Pipeline(config, out, **options).run_all(jobs)
