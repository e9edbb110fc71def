"""Item 9: the command line's start-up.

``osrm run missing.yaml`` (parse the arguments, find the bad input, exit 2) against importing
torch alone, each in a fresh interpreter, interleaved. The command line needs torch for its
registries (merge methods, inits, constraints) but not peft, transformers, scikit-learn or scipy:
those are imported when a command uses them. Goal <= 1.5x. The detail also gives, against the
same baseline, a fresh interpreter that imports what the command line imported before this
item (every workflow, peft, transformers, scikit-learn).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import ROOT, Context, Row, interleave, median, paired_ratio, rounded

#: Each side's command: a fresh interpreter each time.
SIDES = {
    "torch_import": ["-c", "import torch"],
    "osrm_bad_input": ["-m", "osrm_core.cli", "run", "{missing}"],
    "everything_imported": ["-c", "import osrm_core.workflows, osrm_core.advisor, osrm_core.study, peft, sklearn"],
}


def _timed_process(args: list[str], missing: str) -> float:
    command = [sys.executable, *(a.format(missing=missing) for a in args)]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    expected = 2 if "osrm_core.cli" in args else 0
    if proc.returncode != expected:
        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return seconds


def startup_row(ctx: Context) -> Row:
    repeats = max(ctx.repeats, 5 if ctx.quick else 10)
    with tempfile.TemporaryDirectory(prefix="osrm-bench-startup-") as tmp:
        missing = str(Path(tmp) / "missing.yaml")
        samples = interleave({k: (lambda a=a: _timed_process(a, missing)) for k, a in SIDES.items()}, repeats)
    before = paired_ratio(samples["everything_imported"], samples["torch_import"])
    return Row(
        "9", "osrm start-up: bad-input exit / import torch (wall time)",
        paired_ratio(samples["osrm_bad_input"], samples["torch_import"]), "<=", 1.5,
        ours=median(samples["osrm_bad_input"]), baseline=median(samples["torch_import"]), repeats=repeats,
        detail=(f"fresh interpreters, interleaved; `osrm run missing.yaml` exits 2 after parsing; importing every "
                f"workflow with peft and scikit-learn (the start-up before lazy imports) is {before:.2f}x torch"),
        command=ctx.cmd("9"), samples=rounded(samples, 3),
    )


def run(ctx: Context, items: set[str]) -> list[Row]:
    if "9" not in items:
        return []
    ctx.log("9 start-up of the command line")
    return [startup_row(ctx)]
