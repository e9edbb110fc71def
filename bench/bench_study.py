"""Item 7: a study in two processes against one process with two threads.

The same small study (default MiniLM, two demo tasks, two inits in the quick run and four
inits x two seeds in the full one, short training) is run twice
by the command line, each in a fresh output folder, on the same two cores (``taskset`` to CPUs
0 and 1 when the machine has more): once as one process with two torch threads
(``OMP_NUM_THREADS=2``), once with ``--jobs 2`` (two worker processes with one thread each;
the statistics are collected first by the parent). Wall time of the whole command, start-up and
report included. Goal: the two-process study at least 1.6x faster. The pair runs back to back
(baseline first, then ours, then in the full run the other way round), so both see the same
background load.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench._common import ROOT, Context, Row, median, paired_ratio, rounded

INITS = ["standard", "osrm", "osrm_gen", "osrm_mean"]


def study_yaml(inits: list[str], seeds: list[int], steps: int) -> dict:
    base = {
        "name": "bench-study",
        "tasks": [{"name": k, "spec": f"demo:{k}"} for k in ("sentiment", "topic")],
        "samples": 32,
        "max_length": 48,
        "max_test": 32,
        "train": {"steps": steps, "batch_size": 16, "lr": 2e-3, "head_lr": 1e-2},
        "merge": {"methods": ["task_arithmetic"], "lambdas": [0.5, 1.0]},
    }
    return {"name": "bench-study", "base": base, "inits": inits, "constraints": ["none"], "seeds": seeds,
            "sample_sizes": [32], "ranks": [8], "a_lr_scales": [1.0]}


def _run(config: Path, out: Path, jobs: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "osrm_core.cli", "study", str(config), "--out", str(out)]
    if jobs > 1:
        command += ["--jobs", str(jobs)]
    if (os.cpu_count() or 1) > 2 and shutil.which("taskset"):
        command = ["taskset", "-c", "0,1", *command]
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not (out / "report.md").is_file():
        raise RuntimeError(f"study failed ({' '.join(command)}): {proc.stderr.strip().splitlines()[-1:]}")
    return seconds


def study_row(ctx: Context) -> Row:
    inits, seeds, steps = (INITS[:2], [0], 10) if ctx.quick else (INITS, [0, 1], 20)
    pairs = 1 if ctx.quick else 2
    samples: dict[str, list[float]] = {"one_process": [], "jobs2": []}
    with tempfile.TemporaryDirectory(prefix="osrm-bench-study-") as tmp:
        config = Path(tmp) / "study.yaml"
        config.write_text(yaml.safe_dump(study_yaml(inits, seeds, steps), sort_keys=False))
        for k in range(pairs):
            order = [("one_process", 1), ("jobs2", 2)]
            for side, jobs in order if k % 2 == 0 else order[::-1]:
                ctx.log(f"8 study, {side}")
                samples[side].append(_run(config, Path(tmp) / f"{side}-{k}", jobs))
    variants = len(inits) * len(seeds)
    return Row(
        "8", "study: 1 process x 2 threads / --jobs 2 (wall time)",
        paired_ratio(samples["one_process"], samples["jobs2"]), ">=", 1.6,
        ours=median(samples["jobs2"]), baseline=median(samples["one_process"]), repeats=pairs,
        detail=(f"osrm study on 2 cores: {variants} variants ({', '.join(inits)} x seeds {seeds}), default MiniLM, "
                f"demo sentiment + topic, {steps} steps, rank 8, 32 test examples, task arithmetic at 2 lambdas; "
                "whole command (start-up, statistics, report) timed"),
        command=ctx.cmd("8"), samples=rounded(samples, 2),
    )


def run(ctx: Context, items: set[str]) -> list[Row]:
    if "8" not in items:
        return []
    ctx.log("8 study in two processes")
    return [study_row(ctx)]
