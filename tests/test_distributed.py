"""Scale-out: data-parallel statistics and fine-tuning on torch.distributed (gloo on the CPU),
the command line under torchrun, collective timeouts, passes over a few layers at a time, and
the memory plan.

Two processes are started with ``torch.multiprocessing`` (the environment set as torchrun sets
it) and compared with one process running the same code: the statistics to 1e-10 relative,
the fine-tuned adapters to float64 rounding.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

#: Fine-tuning used on both sides: an odd global batch, so the two ranks get 4 and 3 examples.
TRAIN = dict(steps=5, batch_size=7, lr=2e-2, warmup_ratio=0.0)
RANK = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bert(seed: int = 0):
    """A tiny float64 BERT classifier without dropout (dropout masks differ between one process
    and two; without it the runs must agree)."""
    from transformers import BertConfig, BertForSequenceClassification

    from osrm_core.models import default_model_path

    tok = _tokenizer()
    config = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    model.name_or_path_ = str(default_model_path())
    return model.double().eval()


def _tokenizer():
    from transformers import AutoTokenizer

    from osrm_core.models import default_model_path

    return AutoTokenizer.from_pretrained(str(default_model_path()))


def _tasks():
    from osrm_core.demo import demo_tasks

    return demo_tasks(seed=0, n_train=30, n_test=12)


def _compute(out: Path, tag: str) -> None:
    """The work both sides do: statistics (all samples, one sample, one layer per pass), an
    adapter fine-tuned a few steps. Distributed when a process group is up."""
    from osrm_core.inits import init_lora
    from osrm_core.settings import TrainSettings
    from osrm_core.stats import collect_feature_stats
    from osrm_core.train import adapter_of, finetune, save_adapter

    tok, tasks = _tokenizer(), _tasks()
    model = _bert()
    stats = [collect_feature_stats(model, tok, t, max_samples=None, batch_size=5) for t in tasks[:3]]
    for k, st in enumerate(stats):
        st.save(out / f"{tag}-stats{k}.safetensors")
    # One sample: the second rank has none and joins the all-reduce with zeros.
    collect_feature_stats(model, tok, tasks[3], max_samples=1).save(out / f"{tag}-one.safetensors")
    passes = collect_feature_stats(model, tok, tasks[3], max_samples=None, batch_size=5, layers_per_pass=1)
    passes.save(out / f"{tag}-passes.safetensors")
    # peft's standard init: OSRM's first row is LayerNorm's null direction (A h = 0 up to
    # rounding), which Adam turns into noise-driven updates that no two runs share exactly.
    peft_model = init_lora(_bert(seed=1), "standard", rank=RANK, alpha=4, seed=3)
    result = finetune(peft_model, tok, tasks[0], TrainSettings(**TRAIN), max_length=16)
    save_adapter(adapter_of(peft_model), out / f"{tag}-adapter")
    (out / f"{tag}-result.json").write_text(json.dumps(result.to_dict()))


def _launch_env(rank: int, world: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)


def _bad_input():
    raise ValueError("run directory holds a run with another config")


def _parallel_worker(rank: int, world: int, port: int, out: str) -> None:
    from osrm_core.distributed import close_distributed, init_distributed, run_on_main

    _launch_env(rank, world, port)
    info = init_distributed(timeout_s=120, device="cpu")
    assert (info.rank, info.world) == (rank, world)
    try:
        # Work done on rank 0 alone reaches every rank, and so does its bad-input error.
        assert run_on_main(lambda: f"from rank {rank}", "answer") == "from rank 0"
        try:
            run_on_main(_bad_input, "creating the run directory")
        except ValueError as err:
            assert str(err) == "run directory holds a run with another config"
        else:
            raise AssertionError("rank 0's ValueError did not reach this rank")
        _compute(Path(out), f"rank{rank}")
    finally:
        close_distributed()


def _stuck_worker(rank: int, world: int, port: int, out: str) -> None:
    from osrm_core.distributed import DistributedError, barrier, init_distributed

    _launch_env(rank, world, port)
    init_distributed(timeout_s=3, device="cpu")
    if rank == 1:
        time.sleep(120)  # hangs; rank 0's barrier must give up, and the job end
        return
    start = time.perf_counter()
    try:
        barrier("waiting for the statistics")
    except DistributedError as err:
        Path(out, "error.json").write_text(json.dumps({"message": str(err), "seconds": time.perf_counter() - start}))
        raise


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _assert_stats_equal(a, b, rtol: float) -> None:
    assert list(a.layers) == list(b.layers) and a.groups() == b.groups()
    for name in a.layers:
        x, y = a.layers[name], b.layers[name]
        assert (x.count, x.n_samples) == (y.count, y.n_samples), name
        for attr in ("sum_outer", "sum", "sum_sample_mean_outer"):
            assert _rel(getattr(x, attr), getattr(y, attr)) < rtol, (name, attr)


# --------------------------------------------------------------------------- two processes


@pytest.fixture(scope="module")
def two_and_one(tmp_path_factory) -> Path:
    """The work of :func:`_compute` done by two gloo processes and by this process alone."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_parallel_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _compute(out, "single")
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.slow
def test_distributed_statistics_equal_one_process(two_and_one) -> None:
    from osrm_core.inits import osrm_mean_subspace, osrm_subspace
    from osrm_core.stats import FeatureStats

    out = two_and_one

    def load(tag: str, what: str) -> FeatureStats:
        return FeatureStats.load(out / f"{tag}-{what}.safetensors")

    for what in ("stats0", "stats1", "stats2", "one", "passes"):
        single = load("single", what)
        for rank in (0, 1):  # every rank holds the reduced statistics
            _assert_stats_equal(load(f"rank{rank}", what), single, rtol=1e-10)
    assert load("rank1", "one").count == load("single", "one").count > 0
    assert load("single", "one").layers[next(iter(load("single", "one").layers))].n_samples == 1
    # The subspaces built on them, OSRM and the reference code's mean-feature variant, agree.
    dist_stats = [load("rank0", f"stats{k}") for k in range(3)]
    one_stats = [load("single", f"stats{k}") for k in range(3)]
    for fn in (osrm_subspace, osrm_mean_subspace):
        a, b = fn(dist_stats, RANK), fn(one_stats, RANK)
        for name in a:
            assert_close(a[name].T @ a[name], b[name].T @ b[name], rtol=0, atol=1e-8)


@pytest.mark.slow
def test_distributed_finetuning_matches_one_process(two_and_one) -> None:
    from osrm_core.adapters import read_adapter_dir

    out = two_and_one
    single = read_adapter_dir(out / "single-adapter")
    results = {tag: json.loads((out / f"{tag}-result.json").read_text()) for tag in ("single", "rank0", "rank1")}
    for rank in (0, 1):
        adapter = read_adapter_dir(out / f"rank{rank}-adapter")
        for name, lw in single.layers.items():
            assert lw.B.abs().max() > 1e-4  # B really trained
            assert_close(adapter.layers[name].A, lw.A, rtol=1e-6, atol=1e-7)
            assert_close(adapter.layers[name].B, lw.B, rtol=1e-6, atol=1e-7)
        for key, tensor in single.head.items():
            assert_close(adapter.head[key], tensor, rtol=1e-6, atol=1e-7)
        r = results[f"rank{rank}"]
        assert_close(r["losses"], results["single"]["losses"], rtol=1e-9, atol=1e-12)
        assert r["tokens"] == results["single"]["tokens"] and r["test_score"] == results["single"]["test_score"]


@pytest.mark.slow
def test_a_stuck_rank_makes_the_others_fail_with_a_clear_message(tmp_path) -> None:
    import torch.multiprocessing as mp

    start = time.perf_counter()
    with pytest.raises(Exception, match="DistributedError"):
        mp.spawn(_stuck_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert time.perf_counter() - start < 60
    error = json.loads((tmp_path / "error.json").read_text())
    assert error["seconds"] < 30
    assert error["message"].startswith("rank 0/2: waiting for the statistics failed: another rank crashed, hangs")
    assert "collective timeout 3 s" in error["message"] and "Ranks 1 failed to pass" in error["message"]


# --------------------------------------------------------------------------- command line under torchrun


def _write_task(folder: Path, task) -> str:
    import pandas as pd

    folder.mkdir(parents=True)
    for name, split in (("train", task.train), ("test", task.test)):
        pd.DataFrame({"text": split.text, "label": [task.label_names[i] for i in split.label]}).to_csv(
            folder / f"{name}.csv", index=False
        )
    return str(folder)


@pytest.mark.slow
def test_osrm_run_under_torchrun_matches_one_process(tmp_path) -> None:
    """``torchrun --nproc_per_node 2 -m osrm_core.cli run``: one answer (rank 0's), one run
    directory written by rank 0 (statistics written one layer per pass), statistics, adapters
    and merged scores equal to a one-process run."""
    import yaml

    from osrm_core.adapters import read_adapter_dir
    from osrm_core.cli import main
    from osrm_core.demo import demo_task
    from osrm_core.diagnostics import quadratic_trace
    from osrm_core.rundir import RunDir

    model_dir = tmp_path / "model"
    _bert().float().save_pretrained(model_dir)
    _tokenizer().save_pretrained(model_dir)
    config = {
        "name": "tiny",
        "model": str(model_dir),
        "tasks": [{"name": k, "spec": _write_task(tmp_path / k, demo_task(k, n_train=24, n_test=10))}
                  for k in ("sentiment", "topic")],
        "rank": RANK, "samples": 16, "max_length": 16, "inits": ["osrm"], "layers_per_pass": 1,
        "train": {"steps": 3, "batch_size": 5},
        "merge": {"methods": ["task_arithmetic"], "lambdas": [0.5, 1.0]},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    args = ["run", str(tmp_path / "run.yaml"), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "osrm_core.cli", "--dist-timeout", "120", *args, "--out", str(tmp_path / "dist")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = json.loads(proc.stdout)  # exactly one JSON document: rank 0's
    assert main([*args, "--out", str(tmp_path / "one")]) == 0

    dist, one = RunDir(tmp_path / "dist"), RunDir(tmp_path / "one")
    assert dist.manifest()["status"] == "done"
    assert {k: v["status"] for k, v in dist.manifest()["stages"].items()} == {
        k: "done" for k in one.manifest()["stages"]
    }
    assert sorted(p.relative_to(dist.path) for p in dist.path.rglob("*") if p.is_file()) == sorted(
        p.relative_to(one.path) for p in one.path.rglob("*") if p.is_file()
    )  # nothing written twice or left half-written by another rank
    assert len(list(dist.stats_dir("sentiment").glob("part-*.safetensors"))) == 2
    stats = one.load_stats()
    for task, st in dist.load_stats().items():
        _assert_stats_equal(st, stats[task], rtol=1e-6)
    for task in ("sentiment", "topic"):
        a, b = (read_adapter_dir(r.adapter_path("osrm", task)) for r in (dist, one))
        for name, lw in b.layers.items():
            # What the adapters do to the task's features, E||(Delta_a - Delta_b) h||^2, relative
            # (float32 weights, and OSRM's LayerNorm null row trained by rounding noise: see above).
            S = stats[task].layers[name].second_moment
            diff = quadratic_trace(a.layers[name].delta.double() - lw.delta.double(), S)
            assert diff <= 1e-6 * quadratic_trace(lw.delta, S)
        scores = [json.loads((r.adapter_path("osrm", task) / "train.json").read_text()) for r in (dist, one)]
        assert scores[0]["tokens"] == scores[1]["tokens"] and scores[0]["test_score"] == scores[1]["test_score"]
        assert_close(scores[0]["losses"], scores[1]["losses"], rtol=1e-5, atol=1e-6)
    assert answer["results"] == one.summary()["results"]


# --------------------------------------------------------------------------- one process


def test_without_a_process_group(tmp_path) -> None:
    from osrm_core.distributed import dist_info, init_distributed, run_on_main
    from osrm_core.settings import TrainSettings
    from osrm_core.stats import collect_feature_stats
    from osrm_core.train import finetune

    assert dist_info().world == 1 and not dist_info().active
    assert init_distributed() == dist_info()  # not launched: nothing to join
    assert run_on_main(lambda: 42, "answer") == 42
    tok, task = _tokenizer(), _tasks()[0]
    with pytest.raises(ValueError, match="distributed=True needs an initialized torch.distributed process group"):
        collect_feature_stats(_bert(), tok, task, distributed=True)
    with pytest.raises(ValueError, match="give shard or distributed=True, not both"):
        collect_feature_stats(_bert(), tok, task, shard=(0, 2), distributed=True)
    with pytest.raises(ValueError, match=r"shard must be \(rank, world\)"):
        collect_feature_stats(_bert(), tok, task, shard=(2, 2))
    with pytest.raises(ValueError, match="layers_per_pass must be a positive integer or None, got 0"):
        collect_feature_stats(_bert(), tok, task, layers_per_pass=0)
    from osrm_core.inits import init_lora

    with pytest.raises(ValueError, match="distributed=True needs an initialized"):
        finetune(init_lora(_bert(), "standard", rank=RANK), tok, task, TrainSettings(steps=1), distributed=True)


def test_launch_environment_is_checked(monkeypatch) -> None:
    from osrm_core.cli import main
    from osrm_core.distributed import init_distributed, timeout_seconds

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="start the job with torchrun --nproc_per_node N or accelerate launch"):
        init_distributed()
    monkeypatch.setenv("OSRM_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="OSRM_DIST_TIMEOUT='soon' is not a number of seconds"):
        timeout_seconds()
    monkeypatch.setenv("OSRM_DIST_TIMEOUT", "60")
    assert timeout_seconds() == 60.0 and timeout_seconds(5) == 5.0
    with pytest.raises(ValueError, match="must be > 0 seconds"):
        timeout_seconds(0)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["--dist-timeout", "0", "show", "nowhere"]) == 2


def test_passes_over_a_few_layers_write_parts_that_load_back(tmp_path) -> None:
    """``layers_per_pass``: each pass stops after its last layer and is written as it finishes;
    the parts load back as the one-pass statistics."""
    from osrm_core.stats import FeatureStats, collect_feature_stats, iter_feature_stats, write_feature_stats

    tok, task, model = _tokenizer(), _tasks()[1], _bert()
    targets = ["query", "value", "intermediate.dense"]
    whole = collect_feature_stats(model, tok, task, max_samples=None, batch_size=8, target_modules=targets)
    ran = []
    handle = model.bert.encoder.layer[1].output.register_forward_pre_hook(lambda m, a: ran.append(1))
    try:
        parts = list(iter_feature_stats(model, tok, task, max_samples=None, batch_size=8, target_modules=targets,
                                        layers_per_pass=2))
    finally:
        handle.remove()
    assert [p.groups() for p in parts] == [
        [[f"bert.encoder.layer.0.attention.self.{k}" for k in ("query", "value")],
         ["bert.encoder.layer.0.intermediate.dense"]],
        [[f"bert.encoder.layer.1.attention.self.{k}" for k in ("query", "value")],
         ["bert.encoder.layer.1.intermediate.dense"]],
    ]
    # The last block's output ran in the last pass (4 batches) and in the one-sample forward that
    # finds the shared inputs, never in the first pass, which stops after block 0.
    assert len(ran) == 4 + 1
    folder = write_feature_stats(model, tok, task, tmp_path / "parts", layers_per_pass=1, max_samples=None,
                                 batch_size=8, target_modules=targets)
    assert len(list(folder.glob("part-*.safetensors"))) == 4
    loaded = FeatureStats.load(folder)
    for name in whole.layers:
        assert_close(loaded.layers[name].sum_outer, whole.layers[name].sum_outer, rtol=1e-12, atol=1e-12)
        assert loaded.layers[name].count == whole.layers[name].count
    assert loaded.groups() == whole.groups()
    with pytest.raises(ValueError, match="holds no part"):
        FeatureStats.load(tmp_path)


def test_memory_plan_counts_what_the_statistics_hold() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from osrm_core.memory import ModelShape, memory_plan
    from osrm_core.stats import collect_feature_stats

    tok, task, model = _tokenizer(), _tasks()[0], _bert()
    stats = collect_feature_stats(model, tok, task, max_samples=8)
    held = sum(
        t.numel() * t.element_size()
        for g in stats.groups()
        for t in (stats.layers[g[0]].sum_outer, stats.layers[g[0]].sum, stats.layers[g[0]].sum_sample_mean_outer)
    )
    shape = ModelShape(32, 2, sum(p.numel() for p in model.parameters()), ((32, 32), (32, 32)), 1)
    plan = memory_plan(shape).set_index("item")["bytes"]
    assert plan["sums held on the devices"] == plan["file per task"] == held
    assert memory_plan(shape, layers_per_pass=1, stats_dtype="float32").set_index("item")["bytes"][
        "sums held on the devices"] == held // 4
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    assert ModelShape.from_config(config).params == sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    seven_b = ModelShape.from_config(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                                 num_attention_heads=32, vocab_size=32000))
    assert seven_b.params == 6_738_415_616  # LLaMA-2-7B
    gib = memory_plan(seven_b).set_index("item")["GiB"]
    assert gib["sums held on the devices"] == 8.0 and gib["base weights"] == 12.55
    with pytest.raises(ValueError, match="stats_dtype must be"):
        memory_plan(seven_b, stats_dtype="float16")
