"""Merge time and peak memory per method: full space against core space, and peft's
``add_weighted_adapter`` where it has the same merge.

    python -m bench.bench_mergers                 # one 4096 x 4096 layer, eight r16 adapters (minutes)
    python -m bench.bench_mergers --d 256 --tasks 4 --rank 4 --repeats 1 --methods ties,iso_c   # quick

One layer of width ``d`` and ``T`` LoRA adapters of rank ``r`` with random factors. For each
method, in one child process (glibc mmap threshold fixed at 64 KiB, so the resident set follows
the live tensors, as in :mod:`bench.bench_memory`), interleaved and repeated:

* full: form the T deltas ``B_i A_i`` (d x d) and ``merge_deltas`` them (a d x d result);
* core: ``merge_deltas(..., space="core")`` on the factors (LoRA factors back, no d x d matrix).

Each side's time and the rise of the resident-set high-water mark (``VmHWM``) over it are
reported, with the ratios full / core (medians over repeats). Where peft has the same merge, its
``add_weighted_adapter`` is timed against ours in the same run: ``cat`` (the exact sum as a rank
``T r`` adapter) against core task arithmetic, and ``ties_svd`` (TIES on the full deltas, then
an SVD to rank r) against our full TIES followed by :func:`osrm_core.merge.low_rank_factors` at
rank r. Absolute figures depend on the machine; the ratios are the result.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ROOT, median, reset_peak, status_kib  # noqa: E402

METHODS = ("task_arithmetic", "ties", "dare_ties", "knots_ta", "tsv_m", "iso_c", "iso_cts", "cart")


def _measure(fn: Callable[[], object]) -> tuple[float, float]:
    """Seconds of ``fn()`` and the rise of the resident-set high-water mark over it (MiB; NaN
    where ``/proc/self/clear_refs`` cannot reset the mark)."""
    gc.collect()
    rss0 = status_kib("VmRSS") if reset_peak() else None
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    peak = float("nan") if rss0 is None else (status_kib("VmHWM") - rss0) / 1024
    del out
    return seconds, peak


def _peft_model(factors, rank: int):
    """One ``Linear(d, d)`` with the T adapters loaded into peft (scale 1: alpha = r)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    d = factors[0].B.shape[0]
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["0"], lora_dropout=0.0)
    model = get_peft_model(nn.Sequential(nn.Linear(d, d, bias=False)), config, adapter_name="t0")
    for i in range(1, len(factors)):
        model.add_adapter(f"t{i}", config)
    layer = model.base_model.model[0]
    with torch.no_grad():
        for i, f in enumerate(factors):
            layer.lora_A[f"t{i}"].weight.copy_(f.A)
            layer.lora_B[f"t{i}"].weight.copy_(f.B)
    return model


def child(d: int, tasks: int, rank: int, methods: list[str], repeats: int, peft: bool) -> list[dict]:
    import torch

    from osrm_core.merge import LoraFactors, low_rank_factors, merge_deltas

    torch.set_num_threads(int(os.environ.get("OSRM_BENCH_THREADS", "1")))
    gen = torch.Generator().manual_seed(0)
    factors = [LoraFactors(torch.randn(d, rank, generator=gen) / rank, torch.randn(rank, d, generator=gen) / d**0.5)
               for _ in range(tasks)]
    core_in = [{"layer": f} for f in factors]

    def full(method: str) -> Callable[[], object]:
        return lambda: merge_deltas([{"layer": f.B @ f.A} for f in factors], method)

    def core(method: str) -> Callable[[], object]:
        return lambda: merge_deltas(core_in, method, space="core")

    sides: list[tuple[str, str, Callable[[], object]]] = []
    for m in methods:
        sides += [(m, "full", full(m)), (m, "core", core(m))]
    if peft:
        model = _peft_model(factors, rank)
        names, ones = [f"t{i}" for i in range(tasks)], [1.0] * tasks

        def peft_merge(kind: str) -> Callable[[], object]:
            def run() -> None:
                model.add_weighted_adapter(names, ones, "merged", combination_type=kind, density=0.5)
                model.delete_adapter("merged")
            return run

        sides += [("peft cat | ours core task_arithmetic", "peft", peft_merge("cat")),
                  ("peft cat | ours core task_arithmetic", "ours", core("task_arithmetic")),
                  ("peft ties_svd | ours full ties + SVD", "peft", peft_merge("ties_svd")),
                  ("peft ties_svd | ours full ties + SVD", "ours",
                   lambda: low_rank_factors(full("ties")()["layer"], rank))]
    for _, _, fn in sides[:2]:  # warm-up: imports, the math library's workspaces
        fn()
    samples: dict[tuple[str, str], list[tuple[float, float]]] = {(a, b): [] for a, b, _ in sides}
    for i in range(repeats):
        for name, side, fn in sides if i % 2 == 0 else sides[::-1]:
            samples[(name, side)].append(_measure(fn))
    return [{"name": n, "side": s, "seconds": [x[0] for x in v], "peak_mib": [x[1] for x in v]}
            for (n, s), v in samples.items()]


def table(rows: list[dict]) -> str:
    """Per comparison: each side's median time and peak, and the ratios first side / second."""
    by_name: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_name.setdefault(r["name"], {})[r["side"]] = r
    lines = [f"{'comparison':40s} {'sides':>10s} {'time s':>17s} {'ratio':>7s} {'peak MiB':>19s} {'ratio':>7s}"]
    for name, sides in by_name.items():
        (a, ra), (b, rb) = list(sides.items())
        ta, tb = median(ra["seconds"]), median(rb["seconds"])
        pa, pb = median(ra["peak_mib"]), median(rb["peak_mib"])
        mem = f"{pa / pb:7.2f}" if pb >= 0.05 else "      -"  # below the KiB granularity of VmHWM
        lines.append(f"{name:40s} {a + '/' + b:>10s} {ta:8.3f} {tb:8.3f} {ta / tb:7.2f} "
                     f"{pa:9.2f} {pb:9.2f} {mem}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=4096, help="layer width (d_out = d_in)")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated registry names")
    p.add_argument("--no-peft", action="store_true", help="skip peft's add_weighted_adapter")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="also write the raw samples here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if args.child:
        rows = child(args.d, args.tasks, args.rank, methods, args.repeats, not args.no_peft)
        print(json.dumps(rows))
        return 0
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OSRM_BENCH_THREADS": str(args.threads),
           "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "bench.bench_mergers", "--child", *(argv if argv is not None else sys.argv[1:])]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        return 1
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"one {args.d} x {args.d} layer, {args.tasks} adapters of rank {args.rank}, {args.threads} thread(s), "
          f"medians of {args.repeats}; ratio = first side / second side")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
