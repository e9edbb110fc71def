"""``osrm run`` killed with SIGKILL during the statistics, the fine-tuning and the sweep, then
resumed: no file a reader looks at is ever corrupt, and the resumed run gives the results of an
uninterrupted one, bit for bit."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from _helpers import (
    CRASH_TASKS,
    ENV,
    crash_files_fixture,  # noqa: F401  (the crash_files fixture)
    osrm,
)
from safetensors.torch import load_file

from osrm_core.lock import LOCK_NAME
from osrm_core.stats import FeatureStats


@pytest.fixture(scope="module")
def reference(crash_files):
    """The uninterrupted reference run, started in the background when the module starts."""
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool.submit(osrm, "run", crash_files["config"], "--out", crash_files["root"] / "reference")
    pool.shutdown(wait=True, cancel_futures=True)


def _done(out: Path) -> set[str]:
    try:
        return set(json.loads((out / "manifest.json").read_text())["stages"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return set()


def _kill_after(config: Path, out: Path, log: Path, done: str, settle: float) -> set[str]:
    """Start ``osrm run``, wait until unit ``done`` is recorded, ``settle`` seconds more, SIGKILL.
    Returns the units done when it died."""
    with open(log, "ab") as err:
        proc = subprocess.Popen([sys.executable, "-m", "osrm_core.cli", "run", str(config), "--out", str(out)],
                                stdout=subprocess.DEVNULL, stderr=err, env=ENV)
        deadline = time.monotonic() + 240
        try:
            while done not in _done(out):
                assert proc.poll() is None, f"the run ended before {done!r}: {log.read_text()[-2000:]}"
                assert time.monotonic() < deadline, f"no {done!r} after 240 s"
                time.sleep(0.002)
            time.sleep(settle)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return _done(out)


def _assert_no_corrupt_file(out: Path) -> None:
    """Every file a reader looks at is whole: the manifest and the JSON/YAML/CSV files parse,
    statistics and adapters load, and each file a finished unit recorded has its hash."""
    import hashlib

    from osrm_core.adapters import read_adapter_dir

    manifest = json.loads((out / "manifest.json").read_text())
    yaml.safe_load((out / "config.yaml").read_text())
    for unit in manifest["stages"].values():
        for rel, sha in unit["files"].items():
            assert hashlib.sha256((out / rel).read_bytes()).hexdigest()[:16] == sha, rel
    for p in out.rglob("*"):
        if p.name.startswith("."):
            assert p.name.endswith(".tmp") or p.name == LOCK_NAME  # never read as results
        elif p.name == "adapter_config.json":
            read_adapter_dir(p.parent)
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".csv":
            pd.read_csv(p)
        elif p.suffix == ".safetensors":
            FeatureStats.load(p) if p.parent.name == "stats" else load_file(str(p))


def _assert_same_results(a: Path, b: Path) -> None:
    for rel in ["results/summary.json", *(f"results/{n}.csv" for n in
                ("sweep_standard", "sweep_osrm", "interference", "own_energy", "angles"))]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    for task in CRASH_TASKS:
        assert load_file(str(a / "stats" / f"{task}.safetensors")).keys() == load_file(str(b / "stats" / f"{task}.safetensors")).keys()
        for key, t in load_file(str(a / "stats" / f"{task}.safetensors")).items():
            assert torch.equal(t, load_file(str(b / "stats" / f"{task}.safetensors"))[key]), (task, key)
        for init in ("standard", "osrm"):
            wa = load_file(str(a / "adapters" / init / task / "adapter_model.safetensors"))
            wb = load_file(str(b / "adapters" / init / task / "adapter_model.safetensors"))
            assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), (init, task)
            ta, tb = (json.loads((r / "adapters" / init / task / "train.json").read_text()) for r in (a, b))
            ta.pop("seconds"), tb.pop("seconds")
            assert ta == tb


@pytest.mark.slow
def test_sigkill_during_statistics_fine_tuning_and_sweep_then_resume(crash_files, reference):
    config, root = crash_files["config"], crash_files["root"]
    out, log = root / "killed", root / "killed.log"
    # During the second task's statistics, during the second adapter's fine-tuning, during the
    # first sweep: each time the unit under way must not be done when the process dies.
    for done, settle, under_way in (
        ("stats/sentiment", 0.05, "stats/topic"),
        ("adapters/standard/sentiment", 0.3, "adapters/standard/topic"),
        ("adapters/osrm/topic", 0.05, "sweep/standard"),
    ):
        units = _kill_after(config, out, log, done, settle)
        assert done in units and under_way not in units, (done, sorted(units))
        _assert_no_corrupt_file(out)
    resumed = osrm("run", config, "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    assert not list(out.rglob(".*.tmp"))  # the killed runs' temporaries are gone
    _assert_no_corrupt_file(out)
    reference = reference.result()
    assert reference.returncode == 0, reference.stderr
    assert json.loads((out / "manifest.json").read_text())["status"] == "done"
    _assert_same_results(out, root / "reference")
