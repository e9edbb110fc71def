"""Item 2: the lambda sweep.

2a. ``SweepEngine`` (one loaded model; per grid point the merged ``W0 + lam * Delta`` is
    written in place, each task's head swapped in, pre-tokenized test batches) against the
    obvious approach: for every grid point reload the base model, load the task adapters into
    a ``PeftModel``, build the merged adapter with peft's ``add_weighted_adapter``, then
    evaluate every task with its own head (``evaluate_model``). Goal: at least 3x faster.
2b. The sweep against its floor, the bare forward passes over the test sets that it must make
    (``SweepEngine.forward_seconds``, timed around each ``predict`` inside the same sweep).
    Goal: within 1.2x.

Both sides: the same grid (task arithmetic and TIES at density 0.5, the same lambdas), the same
four demo tasks and test examples, the same adapters (rank 8 on query/value, random ``A``/``B``
and heads: the values do not change the cost). peft's counterparts of our merges on
``Delta_W``: ``cat`` (exactly ``lam * sum Delta_W_i``) and ``ties_svd`` (TIES on each layer's
``Delta_W``, re-factored by SVD at rank ``T * r``). Single-task scores are computed once,
outside the timing, and given to the engine (the baseline does not compute them either).
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch

from bench._common import Context, Row, interleave, median, paired_ratio, rounded

RANK, ALPHA = 8, 16


def _settings(ctx: Context) -> dict:
    if ctx.quick:
        return {"lambdas": [0.5, 1.0], "max_test": 32, "repeats": ctx.repeats}
    return {"lambdas": [0.3, 0.5, 0.7, 1.0], "max_test": 64, "repeats": ctx.repeats}


def make_adapters(base, tasks, seed: int = 0):
    """One random rank-8 adapter and head per task, as :class:`osrm_core.adapters.Adapter`."""
    from osrm_core.adapters import Adapter, LoraWeights
    from osrm_core.inits import lora_config
    from osrm_core.models import find_target_layers

    gen = torch.Generator().manual_seed(seed)
    targets = find_target_layers(base)
    config = lora_config(
        "standard", RANK, ALPHA, [t.name for t in targets], modules_to_save=["classifier"]
    ).to_dict()
    hidden = base.config.hidden_size
    adapters = {}
    for task in tasks:
        layers = {
            t.name: LoraWeights(
                torch.randn(RANK, t.d_in, generator=gen) / t.d_in**0.5,
                torch.randn(t.d_out, RANK, generator=gen) * 0.05,
                ALPHA / RANK,
            )
            for t in targets
        }
        head = {
            "classifier.weight": torch.randn(task.num_labels, hidden, generator=gen) * 0.05,
            "classifier.bias": torch.zeros(task.num_labels),
        }
        adapters[task.name] = Adapter(layers, head, config)
    return adapters


def write_plain_adapters(adapters, root: Path) -> dict[str, Path]:
    """PEFT folders without heads (peft cannot merge adapters that carry modules_to_save)."""
    from osrm_core.adapters import write_adapter

    out = {}
    for name, ad in adapters.items():
        config = dict(ad.config, task_type=None, modules_to_save=None)
        out[name] = write_adapter(root / name, ad.layers, config)
    return out


def _head(adapter) -> torch.nn.Linear:
    w, b = adapter.head["classifier.weight"], adapter.head["classifier.bias"]
    head = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    return head.eval()


def sweep_rows(ctx: Context) -> list[Row]:
    from peft import PeftModel

    from osrm_core.demo import demo_tasks
    from osrm_core.evaluate import SweepEngine, evaluate_model
    from osrm_core.models import load_base_model

    s = _settings(ctx)
    base, tok = ctx.base_model()
    tasks = demo_tasks(seed=0, n_train=10, n_test=s["max_test"])
    names = [t.name for t in tasks]
    adapters = make_adapters(base, tasks)
    heads = {n: _head(adapters[n]) for n in names}
    methods = ["task_arithmetic", "ties"]
    lambdas = s["lambdas"]
    peft_kwargs = {
        "task_arithmetic": {"combination_type": "cat"},
        "ties": {"combination_type": "ties_svd", "density": 0.5, "svd_rank": RANK * len(tasks)},
    }
    engine_model = copy.deepcopy(base)
    setup = SweepEngine(engine_model, tok, tasks, adapters, max_test=s["max_test"])
    single = setup.single_task_scores()
    setup.restore()
    del setup

    tmp = tempfile.TemporaryDirectory(prefix="osrm-bench-sweep-")
    dirs = write_plain_adapters(adapters, Path(tmp.name))
    forward: list[float] = []

    def obvious() -> float:
        start = time.perf_counter()
        for method in methods:
            for lam in lambdas:
                model, _ = load_base_model()
                peft_model = PeftModel.from_pretrained(model, str(dirs[names[0]]), adapter_name=names[0])
                for n in names[1:]:
                    peft_model.load_adapter(str(dirs[n]), adapter_name=n)
                peft_model.add_weighted_adapter(names, [lam] * len(names), "merged", **peft_kwargs[method])
                peft_model.set_adapter("merged")
                peft_model.eval()
                inner = peft_model.get_base_model()
                for task in tasks:
                    inner.classifier = heads[task.name]
                    evaluate_model(peft_model, tok, task, max_test=s["max_test"])
        return time.perf_counter() - start

    def engine() -> float:
        start = time.perf_counter()
        eng = SweepEngine(engine_model, tok, tasks, adapters, max_test=s["max_test"])
        eng.sweep(methods, lambdas, single=single)
        elapsed = time.perf_counter() - start
        forward.append(eng.forward_seconds)
        eng.restore()
        return elapsed

    try:
        samples = interleave({"obvious": obvious, "engine": engine}, s["repeats"])
    finally:
        tmp.cleanup()
    samples["forward"] = forward
    points = len(methods) * len(lambdas)
    detail = (
        f"default MiniLM; {len(tasks)} demo tasks x {s['max_test']} test examples; {points} grid points "
        f"(task_arithmetic, ties@0.5 x lambdas {lambdas}); rank-{RANK} adapters on query/value"
    )
    return [
        Row(
            "2a",
            "sweep: obvious (reload+peft merge) / SweepEngine",
            paired_ratio(samples["obvious"], samples["engine"]),
            ">=",
            3.0,
            ours=median(samples["engine"]),
            baseline=median(samples["obvious"]),
            repeats=s["repeats"],
            detail=(
                detail
                + "; peft: cat / ties_svd per point, model reloaded per point; the most any engine could "
                f"reach is obvious / bare forward passes = {paired_ratio(samples['obvious'], samples['forward']):.2f}x"
            ),
            command=ctx.cmd("2a"),
            samples=rounded(samples),
        ),
        Row(
            "2b",
            "sweep: SweepEngine / its bare forward passes",
            paired_ratio(samples["engine"], samples["forward"]),
            "<=",
            1.2,
            ours=median(samples["engine"]),
            baseline=median(samples["forward"]),
            repeats=s["repeats"],
            detail=detail
            + "; floor = SweepEngine.forward_seconds of the same sweep (engine build included in ours)",
            command=ctx.cmd("2b"),
            samples=rounded({"engine": samples["engine"], "forward": samples["forward"]}),
        ),
    ]


def run(ctx: Context, items: set[str]) -> list[Row]:
    if not items & {"2a", "2b"}:
        return []
    ctx.log("2 lambda sweep")
    return [r for r in sweep_rows(ctx) if r.item in items]
