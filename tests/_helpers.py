"""Helpers shared by several test modules: messages compared in full, zips built in memory,
damaged copies of a good adapter, small statistics, random zips for the property tests, and
``osrm`` run as a subprocess (one torch thread in the child)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import TINY_TARGETS
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from osrm_core.adapters import PEFT_PREFIX, Adapter, LoraWeights
from osrm_core.demo import demo_task
from osrm_core.models import weight_as_linear
from osrm_core.stats import FeatureStats, LayerStats

ROOT = Path(__file__).resolve().parents[1]
Q0 = TINY_TARGETS[0]  # bert.encoder.layer.0.attention.self.query
A0 = f"{PEFT_PREFIX}{Q0}.lora_A.weight"
B0 = f"{PEFT_PREFIX}{Q0}.lora_B.weight"
#: One torch thread in the children too: the machine is small and shared.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
CRASH_TASKS = ("sentiment", "topic")


def full(pattern: str) -> re.Pattern:
    """An expected message given as a regular expression (matched in full)."""
    return re.compile(pattern)


def assert_message(message: str, expected: str | re.Pattern) -> None:
    """The whole message equals ``expected`` (a string) or fully matches it (a pattern)."""
    if isinstance(expected, re.Pattern):
        assert expected.fullmatch(message), f"{message!r} does not match {expected.pattern!r}"
    else:
        assert message == expected


def osrm(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "osrm_core.cli", *map(str, args)], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=300)


# --------------------------------------------------------------------------- zips and adapters


def zip_bytes(files: dict[str, bytes], *, links: tuple[str, ...] = (), deflate: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        for name in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def folder_files(folder: Path, prefix: str = "adapter/") -> dict[str, bytes]:
    return {prefix + p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def variant(good: Path, dest: Path, *, config: dict | None = None, drop: tuple[str, ...] = (),
            edit: Callable[[dict], None] | None = None, state=None, files: dict[str, bytes] | None = None) -> Path:
    """A copy of the good adapter with its config updated (keys set to ``...`` removed), some
    files dropped, its tensors edited, or files replaced."""
    shutil.copytree(good, dest)
    if config is not None:
        data = json.loads((dest / "adapter_config.json").read_text())
        data.update(config)
        data = {k: v for k, v in data.items() if v is not ...}
        (dest / "adapter_config.json").write_text(json.dumps(data))
    if edit is not None or state is not None:
        tensors = load_file(str(dest / "adapter_model.safetensors")) if state is None else state
        if edit is not None:
            edit(tensors)
        save_file(tensors, str(dest / "adapter_model.safetensors"))
    for name in drop:
        (dest / name).unlink()
    for name, data in (files or {}).items():
        (dest / name).write_bytes(data)
    return dest


def _set(key: str, value: torch.Tensor) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        t[key] = value
    return edit


def _pop(key: str) -> Callable[[dict], None]:
    return lambda t: t.pop(key)


def _nan_at(key: str, value: float) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        t[key] = t[key].clone()
        t[key][0, 0] = value
    return edit


def _pickled(good: Path, dest: Path) -> Path:
    path = variant(good, dest, drop=("adapter_model.safetensors",))
    torch.save(load_file(str(good / "adapter_model.safetensors")), path / "adapter_model.bin")
    return path


def _zip_of(good: Path, dest: Path, **kwargs) -> Path:
    path = dest.with_suffix(".zip")
    path.write_bytes(zip_bytes(folder_files(good), **kwargs))
    return path


def _zip(dest: Path, files: dict[str, bytes], **kwargs) -> Path:
    path = dest.with_suffix(".zip")
    path.write_bytes(zip_bytes(files, **kwargs))
    return path


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _bad_crc(good: Path, dest: Path) -> Path:
    data = bytearray(zip_bytes(folder_files(good)))
    start = data.index(b'"peft_type"')  # inside the stored adapter_config.json
    data[start + 1] ^= 0x20
    path = dest.with_suffix(".zip")
    path.write_bytes(bytes(data))
    return path


PICKLE_MESSAGE = (
    "{}: adapter_model.bin is a pickle, which can run code when loaded; convert it with "
    "safetensors (save_pretrained(..., safe_serialization=True)) or opt in to loading it with allow_pickle"
)


def _csv(rows: list[tuple]) -> bytes:
    return ("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows)).encode()


@pytest.fixture(scope="module", name="crash_files")
def crash_files_fixture(tmp_path_factory, tiny_model_dir) -> dict:
    """Task CSVs (1,500 training rows each, so that every stage lasts long enough to be killed
    in) and the run config for the crash test, plus broken inputs for the command line."""
    root = tmp_path_factory.mktemp("crash")
    specs = []
    for key in CRASH_TASKS:
        task = demo_task(key, n_train=1500, n_test=60)
        rows = [{"text": t, "label": task.label_names[y]} for s in (task.train, task.test) for t, y in zip(s.text, s.label)]
        pd.DataFrame(rows).to_csv(root / f"{key}.csv", index=False)
        specs.append({"name": key, "spec": str(root / f"{key}.csv")})
    config = {
        "name": "crash", "model": str(tiny_model_dir), "tasks": specs, "rank": 2, "alpha": 4, "samples": 1200,
        "max_length": 64, "max_test": 48, "inits": ["standard", "osrm"], "train": {"steps": 60, "batch_size": 8},
        "merge": {"methods": ["task_arithmetic", "ties"], "lambdas": [round(0.1 * i, 1) for i in range(1, 11)]},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    (root / "fractional.csv").write_bytes(_csv([("a", 0.5), ("b", 1.5), ("c", 0.5), ("d", 1.5)]))
    return {"root": root, "config": root / "config.yaml"}


def _layer_stats(X: torch.Tensor) -> LayerStats:
    X = X.to(torch.float64)
    return LayerStats(X.T @ X, X.sum(0), X.shape[0], X.T @ X, X.shape[0])


def _stats(X: torch.Tensor, task: str = "t", layer: str = "layer") -> FeatureStats:
    return FeatureStats({layer: _layer_stats(X)}, task=task)


# --------------------------------------------------------------------------- property tests

PROPERTY = settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

NAMES = st.one_of(
    st.sampled_from([
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter_config.json",
        "adapter_model.safetensors", "adapter_model.bin", "../x", "/abs", "a/../../b", "C:/x", "a\\b",
        ".", "..", "a/", "a/b/", "a" * 300, "a//b", "./a", "x/./y",
    ]),
    st.text(alphabet="ab./\\:", min_size=1, max_size=10),
)
MEMBER = st.tuples(NAMES, st.binary(max_size=64), st.booleans(), st.booleans())


def _random_zip(members, config: bytes | None = None, weights: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names
        with zipfile.ZipFile(buf, "w") as zf:
            if config is not None:
                zf.writestr("ad/adapter_config.json", config)
            if weights is not None:
                zf.writestr("ad/adapter_model.safetensors", weights)
            for name, data, link, deflate in members:
                info = zipfile.ZipInfo(name)
                info.compress_type = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
                if link:
                    info.external_attr = (stat.S_IFLNK | 0o777) << 16
                zf.writestr(info, data)
    return buf.getvalue()


def _flip(data: bytes, positions: list[int]) -> bytes:
    out = bytearray(data)
    for p in positions:
        if out:
            out[p % len(out)] ^= 0x5A
    return bytes(out)


def _all_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*"))



def random_adapters(model, names: list[str], layers: list[str], rank: int, seed: int = 0) -> dict[str, Adapter]:
    """Float64 adapters with random A and B on ``model``'s ``layers``: the k-th of ``names`` covers
    ``layers[k:]`` (different layers) at rank ``rank + k`` and scale ``0.5 + k``; no heads."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, name in enumerate(names):
        lw = {}
        for layer in layers[k:]:
            w = weight_as_linear(model.get_submodule(layer))
            lw[layer] = LoraWeights(torch.randn(rank + k, w.shape[1], generator=gen, dtype=torch.float64),
                                    torch.randn(w.shape[0], rank + k, generator=gen, dtype=torch.float64), 0.5 + k)
        out[name] = Adapter(lw, {}, {})
    return out
