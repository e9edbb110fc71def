"""One writer per run directory: the lock (``osrm_core.lock``) in threads and processes, a
lock left by a killed process taken over, and two concurrent ``osrm run`` on one directory."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from osrm_core.lock import LOCK_NAME, DirLock, LockedError, read_holder

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
HOLD = "import sys, time; from osrm_core.lock import DirLock; DirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)"


def _holder_process(path: Path) -> subprocess.Popen:
    """A child process that takes the lock of ``path`` and sleeps; returns once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_second_writer_is_refused_with_the_holder_named(tmp_path):
    proc = _holder_process(tmp_path)
    try:
        with pytest.raises(LockedError) as err:
            DirLock(tmp_path).acquire()
    finally:
        _kill(proc)
    message = str(err.value)
    assert "\n" not in message
    assert f"process {proc.pid} on host {socket.gethostname()}, started 20" in message
    assert f"delete {str(tmp_path / LOCK_NAME)!r}" in message


@pytest.mark.slow
def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    proc = _holder_process(tmp_path)
    _kill(proc)
    assert read_holder(tmp_path)["pid"] == proc.pid  # the dead holder's record is still there
    with DirLock(tmp_path):
        assert read_holder(tmp_path)["pid"] == os.getpid()
    assert read_holder(tmp_path) is None  # released: no holder recorded


def test_lock_is_reentrant_in_one_thread_and_exclusive_between_threads(tmp_path):
    errors: list[str] = []
    with DirLock(tmp_path), DirLock(tmp_path):  # nested calls of the library in one thread
        worker = threading.Thread(target=lambda: _try(tmp_path, errors), name="other-session")
        worker.start()
        worker.join()
    assert len(errors) == 1 and "another session of this app" in errors[0], errors
    _try(tmp_path, errors)  # free again after the outer release
    assert len(errors) == 1


def _try(path: Path, errors: list[str]) -> None:
    try:
        with DirLock(path):
            pass
    except LockedError as err:
        errors.append(str(err))


def _take_and_hold(path: Path, start: threading.Barrier, outcome: list[str]) -> None:
    start.wait()
    lock = DirLock(path)
    try:
        lock.acquire()
    except LockedError:
        outcome.append("lost")
        return
    outcome.append("won")
    time.sleep(0.05)  # hold it while the others try
    lock.release()


def test_two_takers_at_once_never_both_win(tmp_path):
    for attempt in range(20):
        start, outcome = threading.Barrier(4), []
        threads = [threading.Thread(target=_take_and_hold, args=(tmp_path / str(attempt), start, outcome))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcome) == ["lost", "lost", "lost", "won"]  # all four tried while one held it


# --------------------------------------------------------------------------- osrm run twice


def _osrm_run(config: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "osrm_core.cli", "run", str(config), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _fingerprint(run: Path) -> dict[str, str]:
    """A digest of every file of a run, without wall-clock times (manifest timings, train
    seconds); safetensors by metadata and tensors (their header order varies between processes)."""
    out = {}
    for p in sorted(run.rglob("*")):
        if not p.is_file() or p.name == LOCK_NAME:
            continue
        rel = p.relative_to(run).as_posix()
        h = hashlib.sha256()
        if rel == "manifest.json":
            stages = json.loads(p.read_text())["stages"]
            h.update(json.dumps({k: sorted(v["files"]) for k, v in stages.items()}, sort_keys=True).encode())
        elif p.name == "train.json":
            record = json.loads(p.read_text())
            record.pop("seconds")
            h.update(json.dumps(record, sort_keys=True).encode())
        elif p.suffix == ".safetensors":
            with safe_open(str(p), "pt") as f:
                h.update(json.dumps(f.metadata(), sort_keys=True).encode())
                for key in sorted(f.keys()):
                    h.update(key.encode() + f.get_tensor(key).numpy().tobytes())
        else:
            h.update(p.read_bytes())
        out[rel] = h.hexdigest()
    return out


@pytest.mark.slow
def test_two_concurrent_runs_on_one_directory(tmp_path, tiny_model_dir):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "name": "twice", "model": str(tiny_model_dir), "rank": 2, "alpha": 4, "samples": 200,
        "max_length": 48, "max_test": 60, "inits": ["standard", "osrm"],
        "tasks": [{"name": "sentiment", "spec": "demo:sentiment"}, {"name": "topic", "spec": "demo:topic"}],
        "train": {"steps": 30, "batch_size": 8}, "merge": {"methods": ["task_arithmetic"], "lambdas": [0.5, 1.0]},
    }))
    out = tmp_path / "shared"
    stale = _holder_process(out)  # a writer killed before: its lock must not stop the next one
    _kill(stale)
    first = _osrm_run(config, out)
    alone = _osrm_run(config, tmp_path / "alone")  # the same run alone, meanwhile
    deadline = time.monotonic() + 120
    while (read_holder(out) or {}).get("pid") != first.pid:
        assert first.poll() is None, first.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the first run never took the lock"
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # hold the first writer still while the second tries, however fast it is
    try:
        second = _osrm_run(config, out)
        _, second_err = second.communicate(timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    _, first_err = first.communicate(timeout=600)
    assert second.returncode == 2, second_err
    lines = [line for line in second_err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in second_err, second_err
    assert lines[0].startswith(f"error: {str(out)!r} is being written by another process: process {first.pid} "
                               f"on host {socket.gethostname()}, started "), lines[0]
    assert f"run {config} --out {out})" in lines[0] and f"delete {str(out / LOCK_NAME)!r}" in lines[0]
    assert first.returncode == 0, first_err
    _, alone_err = alone.communicate(timeout=600)
    assert alone.returncode == 0, alone_err
    assert _fingerprint(out) == _fingerprint(tmp_path / "alone")
    assert "results/summary.json" in _fingerprint(out)


@pytest.mark.slow
def test_the_app_refuses_to_run_into_a_directory_another_writer_holds(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.delenv("OSRM_RUN_DIR", raising=False)
    monkeypatch.setenv("OSRM_RUNS_ROOT", str(tmp_path))
    out = tmp_path / "busy"
    proc = _holder_process(out)  # e.g. `osrm run` from a terminal
    try:
        at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=120).run()
        at.multiselect(key="home_demo_tasks").set_value(["sentiment", "topic"])
        at.text_input(key="home_name").set_value("busy")
        at.run()
        at.button(key="home_run").click().run()
    finally:
        _kill(proc)
    assert not at.exception, [e.value for e in at.exception]
    errors = [str(e.value) for e in at.error]
    assert len(errors) == 1 and errors[0].startswith(f"{str(out)!r} is being written by another process: "
                                                     f"process {proc.pid} on host "), errors
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written


def test_a_study_directory_has_one_writer(tmp_path):
    from osrm_core.study import quick_study_config, run_study

    with DirLock(tmp_path / "study"), ThreadPoolExecutor(1) as other:  # another session's thread
        failed = other.submit(run_study, quick_study_config(), tmp_path / "study").exception()
    assert isinstance(failed, LockedError) and "is being written by another session of this app" in str(failed)
    assert sorted(p.name for p in (tmp_path / "study").iterdir()) == [LOCK_NAME]  # nothing written
