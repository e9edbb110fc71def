"""The run directory: a run's config, manifest, statistics, adapters and results.

Layout::

    runs/<name>/config.yaml        what was asked
    runs/<name>/manifest.json      versions, timings and the state of each stage
    runs/<name>/stats/<task>.safetensors
    runs/<name>/adapters/<init>/<task>/   adapter_config.json, adapter_model.safetensors, train.json
    runs/<name>/results/*.csv, results/summary.json

Every file is written atomically and each unit of work is recorded in the manifest when it is
done, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path

import pandas as pd
import torch

from osrm_core.adapters import Adapter, read_adapter_dir
from osrm_core.atomic import atomic_path, write_json, write_text
from osrm_core.settings import ConfigError, RunConfig
from osrm_core.stats import FeatureStats


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

    def train_result(self, init: str, task: str) -> dict:
        """What fine-tuning ``init``'s adapter of ``task`` gave (``train.json``: test score, losses)."""
        return json.loads((self.adapter_path(init, task) / "train.json").read_text(encoding="utf-8"))

    def read_csv(self, name: str) -> pd.DataFrame | None:
        p = self.result_path(name)
        return pd.read_csv(p) if p.is_file() else None

    def summary(self) -> dict | None:
        p = self.result_path("summary.json")
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None


def write_csv(path: Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
