"""Adapters from the wild: every LoRA layout that plain peft writes (rank and alpha patterns,
rsLoRA, lora_bias, modules_to_save beyond the classifier, adapters on other layers than the
others) is read as peft reads it, diagnosed and merged over the union of layers, scored as
peft's own model scores it, and the merged adapter loads back in plain peft."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from osrm_core.adapters import AdapterError, load_adapter, union_layers
from osrm_core.demo import demo_task
from osrm_core.evaluate import SweepEngine, evaluate_model
from osrm_core.export import merge_adapters, merge_inputs, write_merged_adapter
from osrm_core.merge import MERGE_METHODS, merge_deltas
from osrm_core.workflows import diagnose_adapters, task_stats

#: The peft configurations of adapters met in the wild (each on the tiny BERT, SEQ_CLS).
KINDS = {
    "rank_pattern": dict(r=8, lora_alpha=16, target_modules=["query", "value"],
                         rank_pattern={r"layer\.[0-1]\..*query": 4}, alpha_pattern={"value": 32}),
    "rslora": dict(r=4, lora_alpha=8, target_modules=["query", "value"], use_rslora=True),
    "lora_bias": dict(r=4, lora_alpha=8, target_modules=["query", "value"], lora_bias=True),
    "pooler": dict(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["pooler"]),
    "qkv": dict(r=4, lora_alpha=8, target_modules=["query", "key", "value"]),
}


@pytest.fixture(scope="module")
def tasks():
    return [demo_task("sentiment", n_train=12, n_test=16), demo_task("paraphrase", n_train=12, n_test=16)]


def _peft_adapter(make_tiny_model, kind: str, seed: int):
    """A peft model of ``kind`` with random (non-zero) LoRA B, biases and trained modules."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_tiny_model(num_labels=2), LoraConfig(task_type="SEQ_CLS", **KINDS[kind]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_A" not in name:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def wild(make_tiny_model, tmp_path_factory):
    """``{kind: (peft model, folder it was saved to)}``."""
    root = tmp_path_factory.mktemp("wild")
    out = {}
    for seed, kind in enumerate(KINDS):
        model = _peft_adapter(make_tiny_model, kind, seed)
        model.save_pretrained(root / kind)
        out[kind] = (model, root / kind)
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_layers_match_peft_get_delta_weight(wild, tiny_model, kind) -> None:
    peft_model, folder = wild[kind]
    adapter = load_adapter(folder, tiny_model)
    modules = {n: m for n, m in peft_model.get_base_model().named_modules() if hasattr(m, "get_delta_weight")}
    assert sorted(adapter.layers) == sorted(modules)
    for name, lw in adapter.layers.items():
        module = modules[name]
        assert_close(lw.delta, module.get_delta_weight("default"), rtol=1e-12, atol=1e-12)
        assert lw.rank == module.r["default"] and lw.scale == pytest.approx(module.scaling["default"])
        peft_bias = module.lora_B["default"].bias
        if peft_bias is None:
            assert lw.bias is None
        else:  # peft's merge moves the bias by lora_B.bias * scaling
            assert_close(lw.bias_delta, peft_bias * module.scaling["default"])
    if kind == "rank_pattern":  # the regular-expression key of rank_pattern, as peft matches it
        assert {lw.rank for n, lw in adapter.layers.items() if n.endswith("query")} == {4}
    if kind == "pooler":
        assert {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight"} <= set(adapter.head)


def test_dora_and_embedding_lora_are_refused(make_tiny_model, tmp_path) -> None:
    from peft import LoraConfig, get_peft_model

    get_peft_model(make_tiny_model(), LoraConfig(r=2, target_modules=["query"], use_dora=True)).save_pretrained(
        tmp_path / "dora")
    with pytest.raises(AdapterError, match=r"dora: a DoRA adapter \(use_dora: true\); only plain LoRA is supported"):
        load_adapter(tmp_path / "dora")
    get_peft_model(make_tiny_model(), LoraConfig(r=2, target_modules=["word_embeddings"])).save_pretrained(
        tmp_path / "emb")
    with pytest.raises(AdapterError, match="emb: tensor '.*lora_embedding_A' is not supported: only LoRA on linear"):
        load_adapter(tmp_path / "emb")


def test_rank_pattern_keys_are_bounded(wild, tmp_path) -> None:
    import shutil

    shutil.copytree(wild["rslora"][1], tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["rank_pattern"] = {"(a+)+" * 200: 4}
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="field 'rank_pattern' has a key of 1000 characters; at most 500"):
        load_adapter(tmp_path / "a")


def test_diagnosis_over_the_union_is_order_independent(wild, tiny_model, tokenizer, tasks) -> None:
    qv = load_adapter(wild["rslora"][1], tiny_model)
    qkv = load_adapter(wild["qkv"][1], tiny_model)
    union = list(union_layers({"a": qv, "b": qkv}))
    stats = task_stats(tiny_model, tokenizer, tasks, samples=8, target_modules=union)
    first = diagnose_adapters(tiny_model, {"sentiment": qkv, "paraphrase": qv}, stats)
    second = diagnose_adapters(tiny_model, {"paraphrase": qv, "sentiment": qkv}, stats)
    assert_close(torch.tensor(first.matrix.sort_index().sort_index(axis=1).to_numpy()),
                 torch.tensor(second.matrix.sort_index().sort_index(axis=1).to_numpy()))
    cov = first.coverage.set_index("adapter")
    assert cov.loc["sentiment", "layers"] == 6 and cov.loc["paraphrase", "layers"] == 4
    assert cov.loc["paraphrase", "missing"] == "key x2" and cov.loc["sentiment", "missing"] == ""
    uploaded = first.interference.query("init == 'uploaded'")
    assert uploaded.groupby("adapter")["layer"].nunique().to_dict() == {"paraphrase": 4, "sentiment": 6}


def test_merges_over_the_union_for_every_method(wild, tiny_model, tokenizer, tasks) -> None:
    peft_qv, _ = wild["lora_bias"]
    peft_qkv, _ = wild["qkv"]
    adapters = {"sentiment": load_adapter(wild["qkv"][1], tiny_model),
                "paraphrase": load_adapter(wild["lora_bias"][1], tiny_model)}
    union = union_layers(adapters)
    stats = task_stats(tiny_model, tokenizer, tasks, samples=8, target_modules=list(union))
    # task arithmetic against peft's own deltas: the sum where each adapter has weights
    merged = merge_adapters(adapters, "task_arithmetic", lam=0.5)
    for name in union:
        expected = torch.zeros_like(merged[name])
        for peft_model in (peft_qv, peft_qkv):
            module = dict(peft_model.get_base_model().named_modules()).get(name)
            if module is not None and hasattr(module, "get_delta_weight"):
                expected[:, :32] += module.get_delta_weight("default").float()
                if module.lora_B["default"].bias is not None:
                    expected[:, 32] += (module.lora_B["default"].bias * module.scaling["default"]).float()
        assert_close(merged[name], 0.5 * expected, rtol=1e-5, atol=1e-6)
    # every method runs on the union, each adapter contributing zero where it has no weights
    deltas, grams = merge_inputs(adapters, stats)
    for method in MERGE_METHODS:
        out = merge_adapters(adapters, method, lam=0.7, stats=stats)
        assert sorted(out) == sorted(union)
        assert_close(out, merge_deltas(deltas, method, lam=0.7, grams=grams))
        assert out["bert.encoder.layer.0.attention.self.key"].shape == (32, 32)
        assert out["bert.encoder.layer.0.attention.self.query"].shape == (32, 33)  # bias column


def test_core_space_merge_over_the_union_with_bias(wild, tiny_model, tmp_path) -> None:
    """aligned_factors carries the bias as one more rank and rank 0 where an adapter has no
    weights: basis-invariant methods give the full-space merge, and the adapter is written from
    the factors at the merge's numerical rank."""
    from osrm_core.export import aligned_factors
    from osrm_core.merge import LoraFactors

    adapters = {"sentiment": load_adapter(wild["qkv"][1], tiny_model),
                "paraphrase": load_adapter(wild["lora_bias"][1], tiny_model)}
    factors = aligned_factors(adapters)
    for task, dense in zip(factors, merge_inputs(adapters)[0], strict=True):
        for name, f in task.items():
            assert_close(f.delta(), dense[name], rtol=1e-5, atol=1e-6)
    for method in ("task_arithmetic", "tsv_m", "iso_c", "iso_cts", "cart"):
        core = merge_adapters(adapters, method, lam=0.7, space="core", weights=[1.0, 0.6])
        full = merge_adapters(adapters, method, lam=0.7, weights=[1.0, 0.6])
        for name in full:
            assert isinstance(core[name], LoraFactors)
            # float32: the change of basis costs rounding, more where Procrustes whitens (Iso-CTS)
            scale = float(full[name].abs().max())
            assert_close(core[name].delta(), full[name], rtol=1e-4, atol=3e-5 * scale, msg=method)
    out, table = write_merged_adapter(tmp_path / "core", core, adapters)
    _, full_table = write_merged_adapter(tmp_path / "full", full, adapters)
    assert (table["relative_error"] < 1e-5).all() and table["rank"].iloc[0] == full_table["rank"].iloc[0]


def test_sweep_scores_each_adapter_as_peft_does(wild, make_tiny_model, tokenizer, tasks) -> None:
    """Single-task scores of the engine (in-place weights, bias shifts, swapped pooler and head)
    equal those of peft's own model, for a loss (to many digits) and for accuracy."""
    kinds = {"sentiment": "lora_bias", "paraphrase": "pooler"}
    base = make_tiny_model(num_labels=2)
    adapters = {t: load_adapter(wild[k][1], base) for t, k in kinds.items()}
    for metric in ("loss", "accuracy"):
        scored = [t.__class__(**{**t.__dict__, "metric": metric}) for t in tasks]
        engine = SweepEngine(base, tokenizer, scored, adapters)
        try:
            single = engine.single_task_scores()
        finally:
            engine.restore()
        for task in scored:
            assert single[task.name] == pytest.approx(evaluate_model(wild[kinds[task.name]][0], tokenizer, task),
                                                      rel=1e-9)
    # restore() gave the base model back: no parameter of it changed
    fresh = make_tiny_model(num_labels=2)
    for (name, p), q in zip(base.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_merged_adapter_with_bias_loads_in_plain_peft(wild, make_tiny_model, tokenizer, tasks, tmp_path) -> None:
    from peft import PeftModel

    base = make_tiny_model(num_labels=2)
    adapters = {"sentiment": load_adapter(wild["qkv"][1], base), "paraphrase": load_adapter(wild["lora_bias"][1], base)}
    merged = merge_adapters(adapters, "ties", lam=0.8, density=0.5)
    out, table = write_merged_adapter(tmp_path / "m", merged, adapters)
    assert (table["relative_error"] < 1e-5).all()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_bias"] is True and config["task_type"] is None
    engine = SweepEngine(make_tiny_model(num_labels=2), tokenizer, tasks, adapters)
    engine.apply(merged)
    engine._set_params(engine.tasks["paraphrase"].params)
    batch = tokenizer(tasks[1].test.text[:4], padding=True, return_tensors="pt")
    expected = engine.model(**batch).logits
    loaded = PeftModel.from_pretrained(make_tiny_model(num_labels=2), str(out)).eval()
    from safetensors.torch import load_file

    head = load_file(str(out / "heads" / "paraphrase.safetensors"))
    loaded.get_base_model().load_state_dict({k: v.double() for k, v in head.items()}, strict=False)
    assert_close(loaded(**batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_metric_mcc_is_scored_written_and_labelled(wild, make_tiny_model, tokenizer, tasks) -> None:
    """A task entry's ``metric: mcc`` reaches the sweep's rows (``results/sweep_*.csv`` are
    these rows) and the plot's axis; the score is sklearn's MCC of the model's predictions."""
    from sklearn.metrics import matthews_corrcoef

    from osrm_core.evaluate import predict
    from osrm_core.settings import TaskEntry
    from osrm_core.viz import sweep_figure

    assert TaskEntry(name="s", spec="demo:sentiment", metric="mcc").metric == "mcc"
    with pytest.raises(ValueError, match="metric"):
        TaskEntry(name="s", spec="demo:sentiment", metric="auc")
    scored = [t.__class__(**{**t.__dict__, "metric": "mcc"}) for t in tasks]
    base = make_tiny_model(num_labels=2)
    adapters = {"sentiment": load_adapter(wild["rslora"][1], base), "paraphrase": load_adapter(wild["pooler"][1], base)}
    engine = SweepEngine(base, tokenizer, scored, adapters)
    try:
        df = engine.sweep(["task_arithmetic"], [1.0])
        engine.apply(merge_adapters(adapters, "task_arithmetic"))
        engine._set_params(engine.tasks["sentiment"].params)
        pred = predict(base, tokenizer, scored[0].test)
    finally:
        engine.restore()
    assert set(df.metric) == {"mcc"} and "perplexity" not in df.columns
    row = df[df.task == "sentiment"].iloc[0]
    assert row.score == pytest.approx(matthews_corrcoef(scored[0].test.label, pred))
    assert "mcc" in sweep_figure(df.assign(init="x"), y="score", task="sentiment").layout.yaxis.title.text


@pytest.mark.slow
def test_hub_adapters_from_a_local_cache_offline(wild, tmp_path) -> None:
    """``--adapter NAME=hf:OWNER/REPO[@REVISION]`` through huggingface_hub's cache, offline; a
    repo not in the cache is one error line; a pickle beside the safetensors is not read. The
    merged folder's model card names the sources and their hashes."""
    import os
    import shutil
    import subprocess
    import sys

    from osrm_core.adapters import read_adapter_dir

    hub = tmp_path / "hf" / "hub"
    for repo, kind, commit in (("someone--qv", "rslora", "a" * 40), ("someone--bias", "lora_bias", "b" * 40)):
        snapshot = hub / f"models--{repo}" / "snapshots" / commit
        shutil.copytree(wild[kind][1], snapshot)
        (snapshot / "adapter_model.bin").write_bytes(b"not to be read")
        (hub / f"models--{repo}" / "refs").mkdir()
        (hub / f"models--{repo}" / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)

    def osrm(*args):
        return subprocess.run([sys.executable, "-m", "osrm_core.cli", *map(str, args)], capture_output=True,
                              text=True, env=env, timeout=300)

    ok = osrm("merge", "--adapter", "a=hf:someone/qv", "--adapter", f"b=hf:someone/bias@{'b' * 40}",
              "--out", tmp_path / "merged")
    assert ok.returncode == 0, ok.stderr
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "library_name: peft" in card and "- merge" in card and "- osrm" in card
    assert "hf:someone/qv" in card and f"hf:someone/bias@{'b' * 40}" in card
    expected = {"a": read_adapter_dir(wild["rslora"][1]), "b": read_adapter_dir(wild["lora_bias"][1])}
    assert expected["a"].sha256 in card and expected["b"].sha256 in card
    written = read_adapter_dir(tmp_path / "merged")
    for name, delta in merge_adapters(expected, "task_arithmetic").items():
        assert_close(written.layers[name].delta, delta[:, :32], atol=1e-5, rtol=0)
    missing = osrm("merge", "--adapter", "a=hf:someone/qv", "--adapter", "b=hf:nobody/nothing",
                   "--out", tmp_path / "m2")
    errors = [line for line in missing.stderr.splitlines() if line.startswith("error:")]
    assert missing.returncode == 2 and len(errors) == 1 and "Traceback" not in missing.stderr
    assert "'hf:nobody/nothing' cannot be fetched from the Hugging Face Hub" in errors[0]


def test_truncation_error_is_the_svd_tail(wild, tiny_model) -> None:
    """``--out-rank`` reports ``||Delta - B A|| / ||Delta||``: for the best rank-k
    approximation, the norm of the dropped singular values over all of them."""
    from osrm_core.export import factor_merged

    adapters = {"a": load_adapter(wild["qkv"][1], tiny_model), "b": load_adapter(wild["rslora"][1], tiny_model)}
    merged = merge_adapters(adapters, "task_arithmetic")
    layers, table = factor_merged(merged, rank=2)
    for row in table.itertuples():
        s = torch.linalg.svdvals(merged[row.layer].double())
        assert row.rank == 2 and layers[row.layer].rank == 2
        assert row.relative_error == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-6)
    assert (factor_merged(merged)[1]["relative_error"] < 1e-6).all()
