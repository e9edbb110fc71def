"""Item 4: peak resident memory of feature statistics, against width and tokens.

All configurations run in one subprocess (``python -m bench.bench_memory --child ...``) with a
synthetic model: an embedding of width ``d`` (1,000 rows) feeding one adapted layer
``layer.0.query`` (a ``Linear(d, 8)``), so the statistics' own memory is not hidden behind model
weights or activations. Examples are fixed-length texts (``TOKENS_PER_EXAMPLE`` tokens, no
padding), so the token count is exact.

The child runs with a fixed glibc mmap threshold (64 KiB): every large block is mapped when
allocated and unmapped when freed, so the resident set follows the live tensors and the figures
repeat to the KiB. For each measurement the kernel's resident-set high-water mark (``VmHWM``) is
reset (``/proc/self/clear_refs``), the bare forward passes run, and the rise of the mark is
noted; it is reset again, ``collect_feature_stats`` runs over the same batches, and the rise is
noted. The statistics' overhead is the difference. Expected: the float64 state, two (d, d)
matrices (``sum h h^T`` and ``sum m m^T``) and a (d,) vector, plus one batch's transients (the
real tokens gathered in float32 and converted to float64), whatever the number of tokens.

4a. Does it grow with tokens? overhead at 4 batches / overhead at 1 batch (width 2048).
    Goal <= 1.10.
4b. Is it the d^2 state and nothing else? measured overhead / model at width 4096, the model
    being (2 d^2 + d) * 8 bytes plus 12 * tokens_per_batch * d bytes. Goal <= 1.10. The widths
    384, 1024, 2048 and 4096 are in the detail (and float32 at 4096 in the full run).

``plan_7b()`` gives the figures for a 7B-class model (32 layers, width 4096), see BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench._common import ROOT, Context, Row, median, reset_peak, status_kib

TOKENS_PER_EXAMPLE = 128
BATCH_SIZE = 8  # 1,024 tokens per batch


def child(configs: list[tuple[int, int, str]], repeats: int) -> list[dict]:
    """Measure each (width, tokens, dtype) in this process, ``repeats`` times in turn (MiB).

    With the fixed mmap threshold set by :func:`measure`, a freed statistics state leaves the
    resident set at once, so measurements in one process do not disturb each other.
    """
    import gc

    import torch
    from torch import nn
    from transformers import AutoTokenizer

    from osrm_core.batching import iter_batches
    from osrm_core.data import TaskData
    from osrm_core.models import default_model_path
    from osrm_core.stats import collect_feature_stats

    torch.set_num_threads(int(os.environ.get("OSRM_BENCH_THREADS", "1")))
    dtypes = {"float64": torch.float64, "float32": torch.float32}
    tok = AutoTokenizer.from_pretrained(str(default_model_path()))

    class Block(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.query = nn.Linear(d, 8)

    class Synthetic(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.embed = nn.Embedding(1000, d)
            self.layer = nn.ModuleList([Block(d)])

        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            return self.layer[0].query(self.embed(input_ids % 1000))

    def kw(dtype_name: str) -> dict:
        return dict(target_modules=["query"], max_samples=None, batch_size=BATCH_SIZE,
                    max_length=TOKENS_PER_EXAMPLE, dtype=dtypes[dtype_name])

    def bare(m: nn.Module, task: TaskData) -> None:
        with torch.no_grad():
            for b in iter_batches(tok, task.train, batch_size=BATCH_SIZE, max_length=TOKENS_PER_EXAMPLE,
                                  with_labels=False):
                m(**b)

    torch.manual_seed(0)
    models = {w: Synthetic(w).eval() for w in sorted({w for w, _, _ in configs})}
    tasks = {t: _synthetic_task(t) for t in sorted({t for _, t, _ in configs})}
    one_batch = _synthetic_task(BATCH_SIZE * TOKENS_PER_EXAMPLE)
    # Warm-up at every width and dtype: the imports and caches of a first call, the math
    # library's workspace for products of that size, the forward passes' steady state.
    for w, _, dt in configs:
        collect_feature_stats(models[w], tok, one_batch, **kw(dt))
        bare(models[w], one_batch)
    out = []
    for _ in range(repeats):
        for width, tokens, dtype_name in configs:
            model, task = models[width], tasks[tokens]
            gc.collect()
            ok = reset_peak()
            rss0 = status_kib("VmRSS")
            bare(model, task)
            bare_rise = status_kib("VmHWM") - rss0
            gc.collect()
            reset_peak()
            rss1 = status_kib("VmRSS")
            stats = collect_feature_stats(model, tok, task, **kw(dtype_name))
            stats_rise = status_kib("VmHWM") - rss1
            st = stats.layers["layer.0.query"]
            state = sum(t.numel() * t.element_size() for t in (st.sum_outer, st.sum, st.sum_sample_mean_outer))
            out.append({"width": width, "tokens": st.count, "dtype": dtype_name, "reset_ok": ok,
                        "bare_rise_mib": bare_rise / 1024, "stats_rise_mib": stats_rise / 1024,
                        "overhead_mib": (stats_rise - bare_rise) / 1024, "state_mib": state / 2**20})
            del stats, st
    return out


def _synthetic_task(tokens: int):
    """A task of about ``tokens`` tokens: repeated words, ``TOKENS_PER_EXAMPLE`` tokens an example."""
    import numpy as np

    from osrm_core.data import Split, TaskData

    n = max(1, tokens // TOKENS_PER_EXAMPLE)
    words = "the model reads these words".split()
    text = [" ".join(words[(i + j) % len(words)] for j in range(TOKENS_PER_EXAMPLE - 2)) for i in range(n)]
    split = Split(text, np.arange(n) % 2)
    return TaskData("synthetic", split, split, ["a", "b"])


def measure(configs: list[tuple[int, int, str]], repeats: int = 1, threads: int = 1) -> list[dict]:
    """Run :func:`child` in a subprocess and return its measurements."""
    # A fixed mmap threshold: every block above 64 KiB is mapped on allocation and unmapped on
    # free, so the resident set follows the live tensors (glibc's adaptive threshold otherwise
    # keeps some freed blocks resident, by chance, and the figures wander by +-10 MiB).
    env = {
        **os.environ,
        "OSRM_BENCH_THREADS": str(threads),
        "PYTHONWARNINGS": "ignore",
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }
    spec = ",".join(f"{w}:{t}:{dt}" for w, t, dt in configs)
    out = subprocess.run(
        [sys.executable, "-m", "bench.bench_memory", "--child", spec, str(repeats)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory child ({spec}) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def plan_7b(layers: int = 32, width: int = 4096) -> dict:
    """Sizes of the statistics of a 7B-class model (one shared q/v input per layer)."""
    per_layer = {k: (2 * width * width + width) * b for k, b in (("float64", 8), ("float32", 4))}
    return {
        "layers": layers,
        "width": width,
        "per_layer_mib": {k: v / 2**20 for k, v in per_layer.items()},
        "all_layers_gib": {k: layers * v / 2**30 for k, v in per_layer.items()},
        "sum_outer_only_gib": {
            k: layers * width * width * b / 2**30 for k, b in (("float64", 8), ("float32", 4))
        },
    }


def predicted_mib(width: int, dtype: str = "float64") -> float:
    """The model: the state (two (d, d) matrices and a (d,) vector) plus one batch's transients,
    the real tokens gathered in float32 (4 bytes per entry) and then either converted to float64
    (8 bytes) or, in float32, the masked (batch, tokens, d) block of the per-sample sums (4)."""
    size = 8 if dtype == "float64" else 4
    batch_tokens = BATCH_SIZE * TOKENS_PER_EXAMPLE
    return ((2 * width * width + width) * size + batch_tokens * width * (4 + size)) / 2**20


def memory_rows(ctx: Context, items: set[str]) -> list[Row]:
    base = BATCH_SIZE * TOKENS_PER_EXAMPLE  # one batch
    reps = ctx.repeats
    configs = [
        (384, base, "float64"),
        (1024, base, "float64"),
        (2048, base, "float64"),
        (2048, 4 * base, "float64"),
        (4096, base, "float64"),
    ]
    if not ctx.quick:
        configs += [(2048, 16 * base, "float64"), (4096, base, "float32")]
    ctx.log(f"4 memory: {len(configs)} configurations x {reps} repeats (one subprocess)")
    runs = measure(configs, repeats=reps, threads=ctx.threads)
    results: dict[tuple, dict] = {}
    for width, tokens, dtype in configs:
        mine = [r for r in runs if (r["width"], r["tokens"], r["dtype"]) == (width, tokens, dtype)]
        r = dict(mine[0])
        r["overhead_mib"] = median([m["overhead_mib"] for m in mine])
        r["overhead_runs_mib"] = [round(m["overhead_mib"], 2) for m in mine]
        r["predicted_mib"] = predicted_mib(width, dtype)
        results[(width, tokens, dtype)] = r
    table = "; ".join(
        f"d={w} N={r['tokens']}{'' if dt == 'float64' else ' ' + dt}: +{r['overhead_mib']:.1f} MiB "
        f"(state {r['state_mib']:.1f}, model {r['predicted_mib']:.1f})"
        for (w, _, dt), r in results.items()
    )
    p7 = plan_7b()
    plan_text = (
        f"7B plan (32 layers x 4096, q/v share one input): {p7['per_layer_mib']['float64']:.0f} MiB/layer "
        f"float64, {p7['per_layer_mib']['float32']:.0f} float32; all layers {p7['all_layers_gib']['float64']:.1f} "
        f"GiB / {p7['all_layers_gib']['float32']:.1f} GiB, the same on disk per task"
    )
    one, four = results[(2048, base, "float64")], results[(2048, 4 * base, "float64")]
    wide = results[(4096, base, "float64")]
    samples = {f"{w}x{t}-{dt}": r for (w, t, dt), r in results.items()}
    def row(item: str, title: str, ours: float, baseline: float, detail: str, extra: dict) -> Row:
        return Row(item, title, ours / baseline, "<=", 1.10, ours=ours, baseline=baseline, repeats=reps,
                   detail=detail, command=ctx.cmd(item), samples={**extra, **samples})

    rows = []
    if "4a" in items:
        rows.append(row("4a", "stats memory: 4x tokens / 1x tokens (d=2048)", four["overhead_mib"],
                        one["overhead_mib"], f"peak RSS rise over the bare forward passes, MiB (medians), batch "
                        f"{BATCH_SIZE}x{TOKENS_PER_EXAMPLE} tokens; {table}", {}))
    if "4b" in items:
        rows.append(row("4b", "stats memory: measured / (d^2 state + 1 batch), d=4096", wide["overhead_mib"],
                        wide["predicted_mib"], f"model = (2d^2+d)*8 B + batch tokens*d*12 B; the d^2 state is "
                        f"{wide['state_mib'] / wide['overhead_mib']:.0%} of the rise at d=4096; {table}; {plan_text}",
                        {"plan_7b": p7}))
    return rows


def run(ctx: Context, items: set[str]) -> list[Row]:
    if not items & {"4a", "4b"}:
        return []
    return memory_rows(ctx, items)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=2, metavar=("W:N:DTYPE,...", "REPEATS"), required=True)
    a = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    spec, repeats = a.child
    configs = [(int(w), int(n), dt) for w, n, dt in (c.split(":") for c in spec.split(","))]
    print(json.dumps(child(configs, int(repeats))))
