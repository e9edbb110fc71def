"""The run directory: a run's config, manifest, statistics, adapters and results.

Layout::

    runs/<name>/config.yaml        what was asked
    runs/<name>/manifest.json      versions, timings and the state of each stage
    runs/<name>/stats/<task>.safetensors
    runs/<name>/adapters/<init>/<task>/   adapter_config.json, adapter_model.safetensors, train.json
    runs/<name>/results/*.csv, results/summary.json
    runs/<name>/data/<task>/       train.csv, test.csv of a task uploaded in the app

Every file is written atomically and each unit of work is recorded in the manifest when it is
done, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import pandas as pd
import torch

from osrm_core.adapters import Adapter, read_adapter_dir
from osrm_core.atomic import atomic_path, write_json, write_text
from osrm_core.runcheck import file_hash, read_manifest, read_result_table, read_summary
from osrm_core.settings import ConfigError, RunConfig
from osrm_core.stats import FeatureStats


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

    def task_data_path(self, task: str) -> Path:
        """Where a task given as data (an upload in the app) is saved, so that its config entry
        (``spec``: this folder) loads it again on resume and from the command line."""
        return self.path / "data" / task

    # state
    def exists(self) -> bool:
        return self.config_path.is_file()

    def config(self) -> RunConfig:
        return RunConfig.from_yaml(self.config_path)

    def manifest(self) -> dict:
        return read_manifest(self.manifest_path) if self.manifest_path.is_file() else {"stages": {}}

    def is_done(self, key: str) -> bool:
        return self.manifest()["stages"].get(key, {}).get("status") == "done"

    def mark_done(self, key: str, seconds: float, files: list[Path] = ()) -> None:
        manifest = self.manifest()
        manifest["stages"][key] = {
            "status": "done",
            "seconds": round(seconds, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "files": {str(f.relative_to(self.path)): file_hash(f) for f in files if f.is_file()},
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

    def take_merge_settings(self, config: RunConfig) -> bool:
        """Adopt ``config``'s merge settings (methods, lambdas, densities) in a run that is
        otherwise the same, so that only its sweeps are computed again; returns whether they changed."""
        old = self.config()
        if old.model_dump(exclude={"merge"}) != config.model_dump(exclude={"merge"}):
            raise ConfigError(f"run directory {str(self.path)!r} holds a run with other settings than merging")
        if old.merge == config.merge:
            return False
        manifest = self.manifest()
        manifest["stages"] = {k: v for k, v in manifest["stages"].items() if not k.startswith("sweep/")}
        manifest.pop("status", None)
        write_json(self.manifest_path, manifest)
        write_text(self.config_path, config.to_yaml())
        return True

    def remove_partial_files(self) -> list[Path]:
        """Delete the half-written temporary files (``.NAME.XXXX.tmp``, see
        :func:`osrm_core.atomic.atomic_path`) that a killed process leaves behind.

        Called when a run resumes, under the run's lock (:meth:`osrm_core.pipeline.Pipeline.locked`):
        no other writer can be half-way through a file.
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

    def train_result(self, init: str, task: str) -> dict:
        """What fine-tuning ``init``'s adapter of ``task`` gave (``train.json``: test score, losses)."""
        return json.loads((self.adapter_path(init, task) / "train.json").read_text(encoding="utf-8"))

    def read_csv(self, name: str) -> pd.DataFrame | None:
        """``results/<name>``, checked (:class:`osrm_core.runcheck.RunFileError` if damaged), or None."""
        p = self.result_path(name)
        return read_result_table(p, name) if p.is_file() else None

    def summary(self) -> dict | None:
        """``results/summary.json``, checked, or None."""
        p = self.result_path("summary.json")
        return read_summary(p) if p.is_file() else None


def write_csv(path: Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def stage_count(config: RunConfig) -> int:
    """How many stages :meth:`osrm_core.pipeline.Pipeline.run_all` reports (``on_stage``): the
    statistics, then fine-tuning and a merge sweep per init, then the diagnostics."""
    return 2 + 2 * len(config.inits)


def inits_vs_standard(best: pd.DataFrame) -> pd.DataFrame:
    """Each init minus standard LoRA at its best merged point, per merge method: the plain merged
    average (what a merged model scores) and the normalized one (what merging cost each task; an
    init that learned less can lose less and still score lower).

    ``best`` is the best-point table of :func:`osrm_core.viz.summary_tables` (columns ``init,
    method, avg_score, normalized_avg``). Returns one row per method with a column
    ``<init> - standard (plain)`` and ``(normalized)`` per other init; empty without standard or
    without another init.
    """
    inits = list(dict.fromkeys(best["init"])) if "init" in best else []
    if "standard" not in inits or len(inits) < 2:
        return pd.DataFrame()
    diffs = []
    for value, label in (("avg_score", "plain"), ("normalized_avg", "normalized")):
        table = best.pivot_table(index="method", columns="init", values=value)
        diffs += [(table[i] - table["standard"]).rename(f"{i} - standard ({label})") for i in inits if i != "standard"]
    return pd.concat(diffs, axis=1).reset_index()
