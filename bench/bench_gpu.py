"""Item 6: statistics, eigendecomposition and a fine-tuning step on a GPU, against the CPU run
of the same work and against the card's measured matrix rate. Run through ``bench/gpu.sh``.

    bench/gpu.sh              # CUDA: width 4096, fits in 5 minutes of device time
    bench/gpu.sh --cpu        # no GPU: the same script on the CPU with tiny sizes (a smoke test)

Measured, on the device and on the CPU of the same machine:

* matrix rate: the best of a few square matmuls (float64, float32, TF32 and bfloat16 on a GPU),
  in TFLOP/s: the ceiling the other figures are read against;
* statistics: ``collect_feature_stats`` of a synthetic width-``d`` input (an embedding feeding one
  adapted ``Linear``), float64 sums, fixed-length examples; tokens/s end to end, and the
  accumulation's own rate, ``2 d^2`` float64 flops per token over the hooked forward passes;
* eigendecomposition: ``symmetric_eigh`` of the (d, d) float64 second moment, then
  ``osrm_subspace`` (rank 8) from two tasks' statistics;
* fine-tuning: ``finetune`` of the default model with LoRA r=8 (batch 32, 128 tokens), tokens/s
  and the achieved rate (``4 * parameters`` flops per token for the frozen backbone's forward and
  input-gradient passes, a lower bound) against the float32 matmul rate.

The CPU side runs fewer tokens and steps (rates, not totals, are compared). ``--json PATH``
writes the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device, dtype, n: int, repeats: int = 5) -> float:
    """Best TFLOP/s of an (n, n) @ (n, n) product."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def matrix_rates(device, n: int) -> dict[str, float]:
    import torch

    rates = {
        "float64": matmul_rate(device, torch.float64, n),
        "float32": matmul_rate(device, torch.float32, n),
    }
    if device.type == "cuda":
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            rates["tf32"] = matmul_rate(device, torch.float32, n)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        rates["bfloat16"] = matmul_rate(device, torch.bfloat16, n)
    return rates


def _synthetic_task(n: int, length: int, seed: int = 0):
    import numpy as np

    from osrm_core.data import Split, TaskData

    rng = np.random.default_rng(seed)
    vocab = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
    text = [" ".join(rng.choice(vocab, length - 2)) for _ in range(n)]
    split = Split(text, np.arange(n) % 2)
    return TaskData(f"synthetic{seed}", split, split, ["a", "b"])


def _synthetic_model(width: int, device):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query = nn.Linear(width, 8)

    class Synthetic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(1000, width)
            self.layer = nn.ModuleList([Block()])

        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            return self.layer[0].query(self.embed(input_ids % 1000))

    torch.manual_seed(0)
    return Synthetic().to(device).eval()


def stats_and_eigh(device, width: int, tokens: int, tok) -> dict:
    import torch

    from osrm_core.inits import osrm_subspace
    from osrm_core.spectra import symmetric_eigh
    from osrm_core.stats import collect_feature_stats

    length, batch = 128, 32
    model = _synthetic_model(width, device)
    n = max(batch, tokens // length)
    tasks = [_synthetic_task(n, length, seed) for seed in (0, 1)]
    kw = dict(target_modules=["query"], max_samples=None, batch_size=batch, max_length=length)
    collect_feature_stats(model, tok, _synthetic_task(batch, length, 9), **kw)  # warm-up
    _sync(device)
    start = time.perf_counter()
    stats = collect_feature_stats(model, tok, tasks[0], **kw)
    _sync(device)
    seconds = time.perf_counter() - start
    count = stats.layers["layer.0.query"].count
    # The hot path alone: the same batches, tokenized and on the device beforehand, through the
    # model with the collector's hooks and without; the difference is the accumulation.
    from osrm_core.batching import iter_batches
    from osrm_core.stats.collect import _Collector

    batches = [
        {k: v.to(device) for k, v in b.items()}
        for b in iter_batches(tok, tasks[0].train, batch_size=batch, max_length=length, with_labels=False)
    ]
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            model(**b)
    _sync(device)
    bare = time.perf_counter() - start
    start = time.perf_counter()
    _Collector(model, ["layer.0.query"], torch.float64).run(batches, device, None, len(batches))
    _sync(device)
    hooked = time.perf_counter() - start
    other = collect_feature_stats(model, tok, tasks[1], **kw)
    moment = stats.layers["layer.0.query"].second_moment
    _sync(device)
    start = time.perf_counter()
    symmetric_eigh(moment)
    _sync(device)
    eigh_seconds = time.perf_counter() - start
    start = time.perf_counter()
    osrm_subspace([other], 8)
    _sync(device)
    osrm_seconds = time.perf_counter() - start
    return {
        "width": width,
        "tokens": count,
        "stats_seconds": seconds,
        "stats_tokens_per_s": count / seconds,
        "bare_forward_seconds": bare,
        "hooked_forward_seconds": hooked,
        "hooks_tokens_per_s": count / hooked,
        "accumulate_tflops": 2 * width * width * count / max(hooked - bare, 1e-9) / 1e12,
        "eigh_seconds": eigh_seconds,
        "osrm_subspace_seconds": osrm_seconds,
    }


def finetune_rate(device, steps: int, base, tok) -> dict:
    import copy

    from osrm_core.demo import demo_task
    from osrm_core.inits import init_lora
    from osrm_core.settings import TrainSettings
    from osrm_core.train import finetune

    task = demo_task("paraphrase", seed=0, n_train=max(64, steps * 32), n_test=10)
    model = init_lora(copy.deepcopy(base).to(device), "standard", rank=8, alpha=16, seed=0)
    warm = TrainSettings(steps=1, batch_size=32, lr=1e-3)
    finetune(model, tok, task, warm, max_length=128, max_test=10)
    config = TrainSettings(steps=steps, batch_size=32, lr=1e-3)
    _sync(device)
    result = finetune(model, tok, task, config, max_length=128, max_test=10)
    params = sum(p.numel() for n, p in base.named_parameters() if "embeddings" not in n)
    return {
        "steps": steps,
        "tokens": result.tokens,
        "seconds": result.seconds,
        "tokens_per_s": result.tokens / result.seconds,
        "achieved_tflops_lower_bound": 4 * params * result.tokens / result.seconds / 1e12,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="no GPU: run on the CPU with tiny sizes")
    parser.add_argument("--width", type=int, help="statistics width (default 4096; --cpu: 256)")
    parser.add_argument("--tokens", type=int, help="statistics tokens on the device (default 262144; --cpu: 4096)")
    parser.add_argument("--steps", type=int, help="fine-tuning steps on the device (default 30; --cpu: 2)")
    parser.add_argument("--cpu-threads", type=int, default=0, help="torch threads for the CPU side (0: all cores)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)

    import warnings

    import torch

    warnings.filterwarnings("ignore")
    from bench._common import setup_process

    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    elif args.cpu:
        torch.set_num_threads(1)  # a smoke test, likely on a shared machine
    setup_process(torch.get_num_threads())
    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device; run with --cpu to test the script on the CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    width = args.width or (256 if args.cpu else 4096)
    tokens = args.tokens or (4096 if args.cpu else 262144)
    steps = args.steps or (2 if args.cpu else 30)
    # The CPU side: fewer tokens and steps (rates are compared, not totals).
    cpu_tokens, cpu_steps = (tokens, steps) if args.cpu else (16384, 3)

    from osrm_core.models import load_base_model

    started = time.perf_counter()
    base, tok = load_base_model()
    out: dict = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (--cpu)"}
    print(f"device: {out['device']}; CPU threads {torch.get_num_threads()}", flush=True)
    out["matrix_rate_tflops"] = {"device": matrix_rates(device, 256 if args.cpu else 8192)}
    out["matrix_rate_tflops"]["cpu"] = matrix_rates(torch.device("cpu"), 256 if args.cpu else 2048)
    print("matrix rate TFLOP/s:",
          json.dumps({k: {d: round(r, 3) for d, r in v.items()} for k, v in out["matrix_rate_tflops"].items()}),
          flush=True)
    out["stats"] = {"device": stats_and_eigh(device, width, tokens, tok)}
    out["stats"]["cpu"] = stats_and_eigh(torch.device("cpu"), width, cpu_tokens, tok)
    out["finetune"] = {"device": finetune_rate(device, steps, base, tok)}
    out["finetune"]["cpu"] = finetune_rate(torch.device("cpu"), cpu_steps, base, tok)

    s_dev, s_cpu = out["stats"]["device"], out["stats"]["cpu"]
    f_dev, f_cpu = out["finetune"]["device"], out["finetune"]["cpu"]
    r_dev = out["matrix_rate_tflops"]["device"]
    lines = [
        (f"statistics tokens/s, end to end (width {width})", s_dev["stats_tokens_per_s"],
         s_cpu["stats_tokens_per_s"], "includes tokenization on the CPU"),
        (
            "statistics tokens/s, hooked forward only",
            s_dev["hooks_tokens_per_s"],
            s_cpu["hooks_tokens_per_s"],
            f"accumulation {s_dev['accumulate_tflops']:.2f} TFLOP/s = {s_dev['accumulate_tflops'] / r_dev['float64']:.0%} of float64 matmul",
        ),
        (f"eigh ({width} x {width}, float64) s", s_dev["eigh_seconds"], s_cpu["eigh_seconds"],
         f"osrm_subspace {s_dev['osrm_subspace_seconds']:.2f} s"),
        (
            "fine-tuning tokens/s (MiniLM, LoRA r=8)",
            f_dev["tokens_per_s"],
            f_cpu["tokens_per_s"],
            f">= {f_dev['achieved_tflops_lower_bound']:.2f} TFLOP/s = {f_dev['achieved_tflops_lower_bound'] / r_dev['float32']:.0%} of float32 matmul",
        ),
    ]
    print(f"\n{'what':42s} {'device':>12s} {'cpu':>12s} {'device/cpu':>10s}  vs matrix rate")
    for name, dev, cpu, note in lines:
        ratio = (cpu / dev) if name.startswith("eigh") else (dev / cpu)
        print(f"{name:42s} {dev:12.4g} {cpu:12.4g} {ratio:9.2f}x  {note}")
    out["seconds"] = time.perf_counter() - started
    print(f"\n{out['seconds']:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0


def pending_row(ctx):
    """Row 6 of the table: GPU figures come from bench/gpu.sh on a machine with a GPU."""
    import torch

    from bench._common import Row

    note = (
        "run bench/gpu.sh on a CUDA machine"
        if not torch.cuda.is_available()
        else "CUDA present: run bench/gpu.sh"
    )
    return Row(
        "6",
        "GPU: stats/eigh/fine-tune vs CPU and matmul rate",
        None,
        ">=",
        1.0,
        detail=f"pending: no GPU in this run ({note}; bench/gpu.sh --cpu is its CPU smoke test)",
        command="bench/gpu.sh",
    )


if __name__ == "__main__":
    sys.exit(main())
