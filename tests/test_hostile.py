"""Hostile and broken inputs: adapters, zips, data files and numbers (a table, each row with
its exact message), random bytes, CSVs and zips thrown at the parsers (hypothesis), two app
sessions side by side in shared mode, and ``osrm run`` killed with SIGKILL at several points.

The table is the one in README.md, "Security model".
"""

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
    B0,
    CRASH_TASKS,
    ENV,
    PICKLE_MESSAGE,
    _nan_at,
    _pickled,
    _zip,
    crash_files_fixture,  # noqa: F401  (the crash_files fixture)
    folder_files,
    osrm,
    variant,
)
from safetensors.torch import load_file

from osrm_core.lock import LOCK_NAME
from osrm_core.stats import FeatureStats

# --------------------------------------------------------------------------- inputs


# --------------------------------------------------------------------------- numbers


# --------------------------------------------------------------------------- two app sessions


# --------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module", autouse=True)
def background(crash_files, tiny_model_dir, good_adapter):
    """The uninterrupted reference run and the command-line cases, started in the background
    when the module starts (each child spends seconds importing torch; the tests in between
    run meanwhile)."""
    root = crash_files["root"]
    pickled = _pickled(good_adapter, root / "pickled")
    nan = _zip(root / "nan", folder_files(variant(good_adapter, root / "nan_dir", edit=_nan_at(B0, float("nan")))))
    evil = _zip(root / "evil", {"../evil": b"1"})
    tasks = ["--task", f"sentiment={root / 'sentiment.csv'}", "--task", f"topic={root / 'topic.csv'}"]
    diagnose = ["diagnose", "--model", tiny_model_dir, *tasks, "--adapter", f"b={good_adapter}"]
    pool = ThreadPoolExecutor(max_workers=2)
    jobs = {
        "reference": pool.submit(osrm, "run", crash_files["config"], "--out", root / "reference"),
        "pickled": pool.submit(osrm, *diagnose, "--adapter", f"a={pickled}"),
        "nan": pool.submit(osrm, *diagnose, "--adapter", f"a={nan}"),
        "evil": pool.submit(osrm, *diagnose, "--adapter", f"a={evil}"),
        "data": pool.submit(osrm, "stats", "--model", tiny_model_dir, "--task", f"a={root / 'fractional.csv'}",
                            "--task", f"b={root / 'topic.csv'}", "--out", root / "stats"),
    }
    yield jobs
    pool.shutdown(wait=True, cancel_futures=True)


CLI_CASES = {
    "pickled": "error: pickled: " + PICKLE_MESSAGE.format("")[2:],
    "nan": f"error: nan.zip: tensor '{B0}' has NaN or Inf values",
    "evil": "error: evil.zip: archive member '../evil' leaves the archive folder ('..')",
    "data": "error: a: label '0.5' is not an integer; labels must be integers 0..K-1 or class names",
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_command_line_exits_2_with_the_message(case, background):
    result = background[case].result()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [CLI_CASES[case]]


# --------------------------------------------------------------------------- SIGKILL and resume


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


def test_sigkill_during_statistics_fine_tuning_and_sweep_then_resume(crash_files, background):
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
    reference = background["reference"].result()
    assert reference.returncode == 0, reference.stderr
    assert json.loads((out / "manifest.json").read_text())["status"] == "done"
    _assert_same_results(out, root / "reference")
