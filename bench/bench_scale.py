"""Diagnose and merge on the 1B-shaped test bed (:mod:`bench.scale_model`), CPU, against
baselines run side by side in the same run, each measurement in its own child process:

    python -m bench.bench_scale --bed /tmp/osrm-scale-bed            # builds the bed once (minutes)
    python -m bench.bench_scale --bed /tmp/bed --shape small --adapters 2 --texts 8 --tokens 16   # quick

* ``forward``: two plain forward passes of the decoder (its layers, no LM head: what statistics
  need) over the two tasks' texts, the model in bfloat16: the wall-time baseline;
* ``diagnose``: projected statistics of the two tasks and every table of ``osrm diagnose``
  (:func:`osrm_core.workflows.task_stats` with the adapters, then ``diagnose_adapters``), for
  each number of adapters; the dense path goes through ``osrm diagnose --stats dense``, whose
  memory plan may refuse it (the refusal is recorded);
* ``stats``: the projected statistics pass alone against the same forward passes, interleaved in
  one process (``--repeats`` pairs; the paired ratio is the figure), for each number of adapters;
  ``--layers 2`` builds a shallower bed of the same widths (the per-layer costs are unchanged);
* ``advise``: the merge advisor (a short search, projected statistics) in core and full space,
  its peak RSS against the bf16 model (the full-space search holds every adapter's dense delta
  and prepared copies of them; the core-space one their factors);
* ``merge``: ``build_merged_adapter`` (what ``osrm merge`` runs) per method, full and core
  space, against peft's ``add_weighted_adapter`` (``cat``, ``svd``, ``ties_svd``) on the same
  adapters loaded into a ``PeftModel`` (peft needs the base model; its time is the call alone).

Each child reports its seconds and the rise of its resident-set high-water mark over the
measured work (``VmHWM`` reset first); the parent adds the child's whole peak (``wait4``).
Results go to ``bench/results/scale-<shape>[-l<layers>][-<device>][-t<texts>][-<part>].json`` and
``.txt`` (``-t`` when not the issue's 64 texts a task).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ROOT, reset_peak, status_kib  # noqa: E402

MERGE_METHODS = ("task_arithmetic", "ties", "tsv_m", "iso_c")
#: Where the children put the model ("cpu", or "cuda" for bench/gpu.sh); set from --device.
DEVICE = os.environ.get("OSRM_BENCH_DEVICE", "cpu")
PEFT_COMBINATIONS = ("cat", "svd", "ties_svd")
GiB = 1 << 30


# --------------------------------------------------------------------------- children


def _measured(fn) -> dict:
    """Seconds of ``fn()``, the rise of the resident-set high-water mark over it and the
    process's whole peak (before and during), in bytes; on CUDA also the peak of allocated GPU
    memory."""
    import torch

    gc.collect()
    cuda = torch.cuda.is_available() and DEVICE != "cpu"
    before = status_kib("VmHWM")
    rss0 = status_kib("VmRSS") if reset_peak() else None
    limit = int(os.environ.get("OSRM_BENCH_LIMIT", "0"))
    signal.signal(signal.SIGALRM, _stop)
    signal.alarm(limit)  # the work stops there, and what it reached is still reported
    start = time.perf_counter()
    try:
        extra = fn() or {}
    except _Limit:
        extra = {"incomplete": limit}
    signal.alarm(0)
    if cuda:
        torch.cuda.synchronize()
        extra["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    seconds = time.perf_counter() - start
    during = status_kib("VmHWM")
    rise = None if rss0 is None else (during - rss0) * 1024
    return {"seconds": seconds, "rise_bytes": rise, "peak_bytes": max(before, during) * 1024, **extra}


class _Limit(Exception):
    """The measured work ran past ``OSRM_BENCH_LIMIT`` seconds."""


def _stop(signum, frame):
    raise _Limit


def _adapters(bed: dict, n: int) -> dict:
    from osrm_core.adapters import load_adapter

    return {name: load_adapter(path, name=name) for name, path in list(bed["adapters"].items())[:n]}


def _tasks(bed: dict, names: list[str]) -> list:
    from osrm_core.data import load_task

    return [load_task(name, bed["tasks"]["ab"[k % 2]], bed["tasks"]["ab"[k % 2]]) for k, name in enumerate(names)]


def _model(bed: dict):
    import torch

    from osrm_core.models import load_base_model

    start = time.perf_counter()
    model, tok = load_base_model(bed["model"], causal_lm=True, dtype=torch.bfloat16, device=DEVICE)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return model, tok, {"load_seconds": time.perf_counter() - start, "model_bytes": size}


def _forward_passes(model, tok, tasks, samples: int, tokens: int) -> None:
    """Plain forward passes of the decoder (no LM head) over the texts the statistics see."""
    import torch

    from osrm_core.batching import iter_batches
    from osrm_core.stats import select_samples

    with torch.no_grad():
        for task in tasks:
            idx = select_samples(len(task.train), samples, 0)
            for batch in iter_batches(tok, task.train, batch_size=32, max_length=tokens, indices=idx,
                                      with_labels=False):
                model.model(**{k: v.to(DEVICE) for k, v in batch.items()})


def child_forward(bed: dict, n: int, samples: int, tokens: int) -> dict:
    model, tok, info = _model(bed)
    tasks = _tasks(bed, ["a", "b"])
    return {**info, **_measured(lambda: _forward_passes(model, tok, tasks, samples, tokens))}


def child_stats(bed: dict, n: int, samples: int, tokens: int, repeats: int) -> dict:
    """The projected statistics pass of the two tasks against plain forward passes over the
    same texts, interleaved in one process (the same model, load and caches for both)."""
    from bench._common import interleave, timed
    from osrm_core.stats import collect_projected_stats

    model, tok, info = _model(bed)
    adapters = _adapters(bed, n)
    tasks = _tasks(bed, list(adapters)[:2])

    def projected() -> None:
        for task in tasks:
            collect_projected_stats(model, tok, task, adapters, max_samples=samples, max_length=tokens)

    sides = {"forward": lambda: timed(lambda: _forward_passes(model, tok, tasks, samples, tokens)),
             "projected": lambda: timed(projected)}
    return {**info, "samples": interleave(sides, repeats)}


def child_diagnose(bed: dict, n: int, samples: int, tokens: int) -> dict:
    from osrm_core.workflows import diagnose_adapters, load_base_for, task_stats

    adapters = _adapters(bed, n)
    start = time.perf_counter()
    model, tok = load_base_for(adapters, bed["model"], dtype=__import__("torch").bfloat16, device=DEVICE)
    info = {"load_seconds": time.perf_counter() - start}
    tasks = _tasks(bed, list(adapters))
    times = {}

    def run():
        t0 = time.perf_counter()
        stats = task_stats(model, tok, tasks, samples=samples, max_length=tokens, adapters=adapters)
        times["stats_seconds"] = time.perf_counter() - t0
        result = diagnose_adapters(model, adapters, stats)
        return {"tables": sorted(result.tables()), "pairs": len(result.interference)}

    return {**info, **_measured(run), **times}


def child_merge(bed: dict, n: int, method: str, space: str) -> dict:
    from osrm_core.workflows import build_merged_adapter

    adapters = _adapters(bed, n)
    with tempfile.TemporaryDirectory() as out:
        return _measured(lambda: {"rank": int(build_merged_adapter(adapters, Path(out) / "m", method,
                                                                   space=space)[1]["rank"].iloc[0])})


def child_peft(bed: dict, n: int, combination: str) -> dict:
    from peft import PeftModel

    model, _, info = _model(bed)
    names = list(bed["adapters"])[:n]
    peft_model = PeftModel.from_pretrained(model, bed["adapters"][names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(bed["adapters"][name], adapter_name=name)
    kwargs = {"density": 0.5} if combination == "ties_svd" else {}
    if combination != "cat":
        kwargs["svd_full_matrices"] = False  # peft's faster SVD: a conservative baseline for us
    return {**info, **_measured(lambda: peft_model.add_weighted_adapter(
        names, [1.0] * n, "merged", combination_type=combination, **kwargs))}


def child_advise(bed: dict, n: int, space: str, samples: int, tokens: int) -> dict:
    """``advise`` (what ``osrm advise`` runs) on ``n`` adapters, projected statistics, in one
    merge space: a short search (task arithmetic and TSV-M, two lambdas, two weight steps)."""
    from osrm_core.advisor import advise

    adapters = _adapters(bed, n)
    model, tok, info = _model(bed)
    tasks = _tasks(bed, list(adapters))

    def run():
        advice = advise(model, tok, adapters, tasks, methods=("task_arithmetic", "tsv_m"), lambdas=(0.5, 1.0),
                        budget=2, max_samples=samples, max_length=tokens, stats="projected", space=space)
        return {"evaluations": advice.evaluations, "space": advice.settings["space"], "notes": advice.notes}

    return {**info, **_measured(run)}


CHILDREN = {"forward": child_forward, "stats": child_stats, "diagnose": child_diagnose, "merge": child_merge,
            "peft": child_peft, "advise": child_advise}


# --------------------------------------------------------------------------- parent


def run_child(bed_dir: Path, kind: str, *args, timeout: float) -> dict:
    """One measurement in a fresh process: its JSON line (or why there is none)."""
    cmd = [sys.executable, "-m", "bench.bench_scale", "--child", kind, "--bed", str(bed_dir), *map(str, args)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "MALLOC_MMAP_THRESHOLD_": "65536",
           "OSRM_BENCH_LIMIT": str(int(timeout * 0.7))}  # the rest of the timeout for loading
    row = {"kind": kind, "args": list(map(str, args))}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "timed_out": timeout}
    if proc.returncode != 0:
        return {**row, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return {**row, "wall": time.perf_counter() - start, **json.loads(proc.stdout.strip().splitlines()[-1])}


def dense_refusal(bed_dir: Path, bed: dict, n: int, samples: int, tokens: int, timeout: float) -> dict:
    """``osrm diagnose --stats dense``: the plan's refusal (exit 2, one line), or its figures."""
    cmd = [sys.executable, "-m", "osrm_core.cli", "diagnose", "--model", bed["model"], "--stats", "dense",
           "--dtype", "bfloat16", "--samples", str(samples), "--max-length", str(tokens), "--json"]
    for k, (name, path) in enumerate(list(bed["adapters"].items())[:n]):
        cmd += ["--adapter", f"{name}={path}", "--task", f"{name}={bed['tasks']['ab'[k % 2]]}"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    except subprocess.TimeoutExpired:
        return {"kind": "dense", "adapters": n, "timed_out": timeout}
    return {"kind": "dense", "adapters": n, "exit": proc.returncode, "wall": time.perf_counter() - start,
            "message": (proc.stderr.strip().splitlines() or [""])[-1]}


def _ratio(a, b) -> float | None:
    return None if a is None or b is None or not b else a / b


def summarize(res: dict) -> list[dict]:
    """The figures against the issue's goals, from the measurements."""
    rows = []
    fwd = res.get("forward", {})
    model_bytes = fwd.get("model_bytes")
    for d in res.get("diagnose", []):
        n = d["args"][0]
        rows.append({"name": f"diagnose peak RSS / bf16 model, {n} adapters", "op": "<=", "target": 1.3,
                     "figure": _ratio(d.get("peak_bytes"), model_bytes),
                     "detail": f"peak {d.get('peak_bytes', 0) / GiB:.2f} GiB, model {model_bytes / GiB:.2f} GiB"})
        rows.append({"name": f"diagnose wall / two forward passes, {n} adapters", "op": "<=", "target": 1.5,
                     "figure": _ratio(d.get("seconds"), fwd.get("seconds")),
                     "detail": f"{d.get('seconds', float('nan')):.1f} s (statistics {d.get('stats_seconds', float('nan')):.1f} s)"
                               f" vs {fwd.get('seconds', float('nan')):.1f} s; loading not counted"})
    for st in res.get("stats", []):
        if "samples" in st:
            from bench._common import median, paired_ratio

            sm = st["samples"]
            rows.append({"name": f"projected statistics pass / plain forward passes, {st['args'][0]} adapters",
                         "op": "<=", "target": 1.5, "figure": paired_ratio(sm["projected"], sm["forward"]),
                         "detail": f"interleaved in one process, {len(sm['forward'])} pairs, medians "
                                   f"{median(sm['projected']):.1f} s vs {median(sm['forward']):.1f} s"})
    peft = {p["args"][1]: p for p in res.get("peft", [])}
    ours = {(m["args"][1], m["args"][2]): m for m in res.get("merge", [])}
    base = peft.get("ties_svd", {})
    for method in ("ties", "tsv_m") if ours else ():
        core = ours.get((method, "core"), {})
        if base.get("incomplete"):
            figure = None if core.get("seconds") is None else base["seconds"] / core["seconds"]
            detail = (f"peft ties_svd stopped unfinished after {base['seconds']:.0f} s: the time ratio is a lower "
                      f"bound; core {core.get('seconds', float('nan')):.2f} s")
        else:
            figure = _ratio(base.get("seconds"), core.get("seconds"))
            detail = f"{base.get('seconds', float('nan')):.1f} s vs {core.get('seconds', float('nan')):.2f} s"
        rows.append({"name": f"peft ties_svd time / core {method}", "op": ">=", "target": 10.0, "figure": figure,
                     "detail": detail})
        rows.append({"name": f"core {method} merge memory / peft ties_svd's", "op": "<=", "target": 0.25,
                     "figure": _ratio(core.get("rise_bytes"), base.get("rise_bytes")),
                     "detail": "rise of the peak over the merge call; whole-process peaks "
                               f"{core.get('peak_bytes', 0) / GiB:.2f} vs {base.get('peak_bytes', 0) / GiB:.2f} GiB"})
    for row in rows:
        f = row["figure"]
        row["met"] = None if f is None else (f <= row["target"] if row["op"] == "<=" else f >= row["target"])
    return rows


def report(res: dict, rows: list[dict]) -> str:
    lines = [f"bench_scale: {res['settings']}", ""]
    if "forward" in res:
        f = res["forward"]
        lines.append(f"two plain forward passes: {f.get('seconds', float('nan')):.1f} s, peak "
                     f"{f.get('peak_bytes', 0) / GiB:.2f} GiB, bf16 model {f.get('model_bytes', 0) / GiB:.2f} GiB")
    for r in rows:
        fig = "n/a" if r["figure"] is None else f"{r['figure']:.3g}"
        verdict = {True: "met", False: "NOT met", None: "n/a"}[r["met"]]
        lines.append(f"{r['name']}: {fig} (goal {r['op']} {r['target']:g}; {verdict}) -- {r['detail']}")
    for a in res.get("advise", []):
        n, space = a["args"][0], a["args"][1]
        if "seconds" not in a:
            lines.append(f"advise, {n} adapters, {space} space: {a.get('error') or 'timed out'}")
            continue
        lines.append(f"advise, {n} adapters, {space} space: {a['seconds']:.0f} s, {a['evaluations']} evaluations, "
                     f"peak RSS {a['peak_bytes'] / GiB:.2f} GiB = {a['peak_bytes'] / a['model_bytes']:.2f}x the bf16 "
                     f"model ({a['model_bytes'] / GiB:.2f} GiB)")
    lines += ["", "dense path (osrm diagnose --stats dense):"]
    for d in res.get("dense", []):
        ran = f"ran in {d['wall']:.0f} s (the plan fits)" if d.get("exit") == 0 else d.get("message") or d
        lines.append(f"  {d['adapters']} adapters: {ran}")
    lines += ["", "merges (seconds, rise of the peak over the call, whole-process peak; GiB):"]
    for m in res.get("merge", []) + res.get("peft", []):
        name = " ".join(m["args"][1:])
        if "seconds" not in m:
            why = m.get("error") or f"timed out after {m.get('timed_out')} s"
            lines.append(f"  {m['kind']} {name}: {why}")
            continue
        rise = "n/a" if m.get("rise_bytes") is None else f"{m['rise_bytes'] / GiB:.3f}"
        cut = " (stopped unfinished: lower bounds)" if m.get("incomplete") else ""
        lines.append(f"  {m['kind']} {name}: {m['seconds']:.2f} s, rise {rise}, peak {m['peak_bytes'] / GiB:.2f}{cut}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bench.scale_model import LLAMA_3_2_1B, LLAMA_3_8B, SMALL, build_testbed

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bed", type=Path, required=True, help="folder of the test bed (built there when missing)")
    p.add_argument("--shape", choices=["1b", "8b", "small"], default="1b")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (bench/gpu.sh scale)")
    p.add_argument("--vocab", type=int, default=None, help="shrink the vocabulary (default: the shape's)")
    p.add_argument("--adapters", default="2,8", help="numbers of adapters to diagnose")
    p.add_argument("--merge-adapters", type=int, default=8)
    p.add_argument("--methods", default=",".join(MERGE_METHODS))
    p.add_argument("--spaces", default="core,full", help="merge spaces of our methods")
    p.add_argument("--peft", default=",".join(PEFT_COMBINATIONS), help="peft's combination types to run beside them")
    p.add_argument("--texts", type=int, default=64)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--timeout", type=float, default=900, help="seconds a measurement may take")
    p.add_argument("--layers", type=int, default=None,
                   help="build the bed with this many decoder layers (default: the shape's; per-layer costs unchanged)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the stats part")
    p.add_argument("--part", choices=["diagnose", "merge", "stats", "advise", "all"], default="all",
                   help="measure only the diagnosis, the merges, the statistics pass against forward passes "
                        "(interleaved in one process) or the advisor (each of --advise-spaces, for each of "
                        "--adapters; --texts sample texts per task); results in scale-<shape>-<part>.*")
    p.add_argument("--advise-spaces", default="core,full", help="merge spaces of the advisor's search")
    p.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        bed = json.loads((args.bed / "testbed.json").read_text())
        rest = [int(x) if x.isdigit() else x for x in args.rest]
        print(json.dumps(CHILDREN[args.child](bed, *rest)))
        return 0
    os.environ["OSRM_BENCH_DEVICE"] = args.device  # for the children
    shape = {**{"1b": LLAMA_3_2_1B, "8b": LLAMA_3_8B, "small": SMALL}[args.shape]}
    if args.vocab:
        shape["vocab_size"] = args.vocab
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    n_max = max([args.merge_adapters, *map(int, args.adapters.split(","))])
    if not (args.bed / "testbed.json").is_file():
        build_testbed(args.bed, shape, adapters=n_max, texts=args.texts, tokens=args.tokens,
                      shard_size="200KB" if args.shape == "small" else "2GB", device=args.device)
    bed = json.loads((args.bed / "testbed.json").read_text())
    settings = {"shape": args.shape, "layers": shape["num_hidden_layers"], "device": args.device,
                "vocab": shape["vocab_size"], "texts": args.texts, "tokens": args.tokens,
                "threads": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count()}
    t = args.timeout
    res: dict = {"settings": settings}
    if args.part in ("diagnose", "all"):
        counts = list(map(int, args.adapters.split(",")))
        res["forward"] = run_child(args.bed, "forward", 0, args.texts, args.tokens, timeout=t)
        res["diagnose"] = [run_child(args.bed, "diagnose", n, args.texts, args.tokens, timeout=t) for n in counts]
        res["dense"] = [dense_refusal(args.bed, bed, n, args.texts, args.tokens, t) for n in counts]
    if args.part in ("stats", "all"):
        res["stats"] = [run_child(args.bed, "stats", n, args.texts, args.tokens, args.repeats, timeout=t)
                        for n in map(int, args.adapters.split(","))]
    if args.part in ("advise", "all"):
        res["advise"] = [run_child(args.bed, "advise", n, space, args.texts, args.tokens, timeout=t)
                         for n in map(int, args.adapters.split(",")) for space in args.advise_spaces.split(",")]
    if args.part in ("merge", "all"):
        n = args.merge_adapters
        res["merge"] = [run_child(args.bed, "merge", n, m, space, timeout=t)
                        for m in args.methods.split(",") for space in args.spaces.split(",")]
        res["peft"] = [run_child(args.bed, "peft", n, c, timeout=t) for c in args.peft.split(",") if c]
    rows = summarize(res)
    suffix = (("" if args.layers is None else f"-l{args.layers}") + ("" if args.device == "cpu" else "-" + args.device)
              + ("" if args.texts == 64 else f"-t{args.texts}") + ("" if args.part == "all" else "-" + args.part))
    out = ROOT / "bench" / "results" / f"scale-{args.shape}{suffix}"
    out.with_suffix(".json").write_text(json.dumps({**res, "rows": rows}, indent=1, default=str))
    text = report(res, rows)
    out.with_suffix(".txt").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
