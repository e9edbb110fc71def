"""Tests of the merge advisor (osrm_core.advisor and ``osrm advise``) on adapters made by plain
peft for the tiny model: splits, intervals, the search, and the written adapter loaded back by
plain peft scoring what advice.json says."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from osrm_core.adapters import load_adapter
from osrm_core.advisor import (
    Search,
    advice_markdown,
    advise,
    grid_table,
    layer_notes,
    score_interval,
    split_samples,
    wilson_interval,
    write_advice,
)
from osrm_core.data import Split
from osrm_core.demo import demo_task

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"

TASKS = {"sentiment": 2, "topic": 4}


def _peft_files(root: Path, base_of) -> dict:
    """Per task: a CSV of 24 labelled texts and a LoRA adapter saved by plain peft on
    ``base_of(classes)`` (random B and head, so each adapter changes the model)."""
    from peft import LoraConfig, get_peft_model

    out = {}
    for seed, (key, classes) in enumerate(TASKS.items()):
        task = demo_task(key, n_train=24, n_test=10)
        pd.DataFrame({"text": task.train.text, "label": task.train.label}).to_csv(root / f"{key}.csv", index=False)
        out[f"csv_{key}"] = root / f"{key}.csv"
        config = LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"])
        model = get_peft_model(base_of(classes), config)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name or "classifier" in name:
                    p.copy_(torch.randn(p.shape, generator=gen))
        model.save_pretrained(root / "adapters" / key)
        out[f"adapter_{key}"] = root / "adapters" / key
    return out


@pytest.fixture(scope="module")
def peft_files(tmp_path_factory, make_tiny_model):
    return _peft_files(tmp_path_factory.mktemp("advise"),
                       lambda classes: make_tiny_model(seed=0, num_labels=classes, dtype=torch.float32))


@pytest.fixture(scope="module")
def advised(peft_files, make_tiny_model, tokenizer, tmp_path_factory):
    from osrm_core.task_spec import parse_task_spec

    model = make_tiny_model(seed=0, dtype=torch.float32)
    adapters = {k: load_adapter(peft_files[f"adapter_{k}"], model) for k in TASKS}
    tasks = [parse_task_spec(str(peft_files[f"csv_{k}"]), name=k) for k in TASKS]
    calls, stages = [], []
    advice = advise(model, tokenizer, adapters, tasks, methods=("task_arithmetic", "ties"), lambdas=(0.5, 1.0),
                    densities=(0.5,), budget=6,
                    max_length=32, progress=lambda *a: calls.append(a), on_stage=stages.append)
    out = write_advice(advice, adapters, tmp_path_factory.mktemp("advice"))
    return {"advice": advice, "adapters": adapters, "tasks": tasks, "calls": calls, "stages": stages, "out": out}


def test_wilson_interval_matches_the_formula() -> None:
    lo, hi = wilson_interval(15, 20)
    p, n, z = 0.75, 20, 1.959964
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert (lo, hi) == pytest.approx((centre - half, centre + half))
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="n must be positive"):
        wilson_interval(0, 0)


def test_score_interval_bootstrap_covers_the_score() -> None:
    y = np.array([0, 1] * 20)
    pred = y.copy()
    pred[:6] = 1 - pred[:6]
    lo, hi = score_interval("mcc", y, pred)
    assert lo < 0.7 < hi and score_interval("mcc", y, pred) == (lo, hi)  # seeded


def test_split_samples_is_stratified_seeded_and_disjoint() -> None:
    task = demo_task("topic", n_train=30, n_test=10)
    v, h, idx = split_samples(task, 0.5, seed=3, use_train=True)
    assert set(idx["validation"]).isdisjoint(idx["heldout"])
    assert len(idx["validation"]) + len(idx["heldout"]) == 40 and idx["split"] == "train+test"
    assert set(v.test.label) == set(h.test.label) == set(range(task.num_labels))
    assert split_samples(task, 0.5, seed=3, use_train=True)[2] == idx
    assert split_samples(task, 0.5, seed=4, use_train=True)[2] != idx
    picked = split_samples(task, 0.5, max_samples=6)[2]
    assert len(picked["validation"]) + len(picked["heldout"]) == 6
    with pytest.raises(ValueError, match="holdout is 1.5"):
        split_samples(task, 1.5)
    from osrm_core.data import TaskData

    split = Split(["a", "b", "c"], np.array([0, 0, 1]))
    one = TaskData("one", split, split, ["x", "y"])
    with pytest.raises(ValueError, match="share has"):
        split_samples(one, 0.5)


def test_advice_reports_the_finalists_with_intervals(advised) -> None:
    advice = advised["advice"]
    summary = advice.summary
    # the grid: 2 lambdas x (task arithmetic + TIES at one density), every evaluation logged
    search = advice.search
    assert list(search["evaluation"]) == list(range(1, len(search) + 1))
    grid = search[search["stage"] == "grid"]
    assert len(grid) == 4 and (search["stage"] == "weights").sum() == len(search) - 4
    # the finalists: the best grid point of each method and density, then the searched weights
    assert (summary["origin"] == "grid").sum() == 2
    for row in summary[summary["origin"] == "grid"].itertuples():
        same = grid[(grid["method"] == row.method) & (grid["density"].fillna(-1) == (-1 if pd.isna(row.density) else row.density))]
        assert row.validation == same["validation"].max() and row.weights in set(same["weights"])
    assert set(summary["origin"]) <= {"default", "grid", "weights"} and (summary["origin"] == "default").sum() == 1
    default = summary[summary["origin"] == "default"].iloc[0]
    assert default["method"] == "task_arithmetic" and default["weights"] == "1/1/1"[: 2 * len(advice.names) - 1]
    table = grid_table(search)
    assert list(table["method"]) == ["task_arithmetic", "ties (density 0.5)"] and list(table.columns[1:]) == ["0.5", "1"]
    assert "## The search on the validation share" in advice_markdown(advice)
    assert ((summary["low"] <= summary["score"]) & (summary["score"] <= summary["high"])).all()
    table = advice.candidates
    assert set(table["task"]) == set(TASKS) and (table["n"] == 12).all()
    assert np.allclose(table["normalized"], table["score"] / table["single"])
    rec = advice.recommended
    margin = advice.settings["selection_margin"]
    assert margin > 0.1  # 6 validation texts per task cannot tell candidates apart
    ta = summary[summary["method"] == "task_arithmetic"]
    base = ta.loc[ta["validation"].idxmax()]
    beats = summary[summary["validation"] > base["validation"] + margin]
    assert rec["validation"] == (beats["validation"].max() if len(beats) else base["validation"])
    assert len(rec["weights"]) == 2 and rec["method"] in ("task_arithmetic", "ties")
    assert "held-out" in advice.reason and f"{rec['heldout']:.3f}" in advice.reason
    assert advice.evaluations == advised["calls"][-1][0] == advised["calls"][-1][1]
    assert advised["stages"][0] == "splitting the samples" and advised["stages"][-1] == "done"


def _plain_peft_heldout_scores(out: Path, tasks, make_tiny_model, tokenizer) -> dict[str, float]:
    """Each task's held-out score of the advised adapter in ``out``, loaded by plain peft with
    the task's head, on the held-out share ``advice.json`` names."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from osrm_core.advisor import sample_pool
    from osrm_core.evaluate import predict, score

    saved = json.loads((out / "advice.json").read_text())
    got = {}
    for task in tasks:
        base = make_tiny_model(seed=0, num_labels=TASKS[task.name], dtype=torch.float32)
        head = load_file(str(out / "adapter" / "heads" / f"{task.name}.safetensors"))
        base.load_state_dict(head, strict=False)
        model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
        held = saved["shares"][task.name]["heldout"]
        pooled, origin = sample_pool(task)
        assert saved["shares"][task.name]["split"] == origin == saved["samples"][task.name]["split"]
        split = Split([pooled.text[i] for i in held], pooled.label[held])
        got[task.name] = score(task.metric, split.label, predict(model, tokenizer, split, max_length=32))
    return got


def test_advised_adapter_loads_in_plain_peft_and_scores_what_advice_json_says(advised, make_tiny_model, tokenizer):
    out = advised["out"]
    assert (out / "advice.md").read_text().startswith("# Merge advice")
    saved = json.loads((out / "advice.json").read_text())
    assert _plain_peft_heldout_scores(out, advised["tasks"], make_tiny_model, tokenizer) == pytest.approx(
        saved["recommended"]["heldout_per_task"])


@pytest.mark.parametrize("method", ["ties", "dare_ties", "knots_ties", "tsv_m", "iso_c"])
def test_weighted_merge_of_the_search_is_the_method_with_weights(method) -> None:
    """The search prepares each (method, density) once (trimming, drops, SVDs) and merges it for
    every weight vector: the same as the method with those weights, which (but for KnOTS, whose
    basis is that of the unweighted deltas) is the method on the weighted deltas."""
    from osrm_core.merge import get_merge_method, merge_deltas

    gen = torch.Generator().manual_seed(0)
    deltas = [{"l.0": torch.randn(6, 5, generator=gen, dtype=torch.float64),
               "l.1": torch.randn(4, 6, generator=gen, dtype=torch.float64)} for _ in range(3)]
    search = Search(None, ["a", "b", "c"], deltas, None, 0, lambda m: None)
    densities = (0.3, 0.5, 1.0) if get_merge_method(method).uses_density else (None,)
    for weights in ([1.0, 1.0, 1.0], [0.3, 1.7, 0.0], [2.0, 0.5, 1.25]):
        for density in densities:
            params = {} if density is None else {"density": density}
            got = search.merged(method, density, weights)
            want = merge_deltas(deltas, method, weights=weights, **params)
            scaled = merge_deltas([{k: w * d for k, d in delta.items()} for w, delta in zip(weights, deltas)],
                                  method, **params)
            for layer in want:
                torch.testing.assert_close(got[layer], want[layer], rtol=0, atol=1e-12)
                if method != "knots_ties":
                    torch.testing.assert_close(got[layer], scaled[layer], rtol=1e-9, atol=1e-12)
    assert set(search.prepared) == {(method, d) for d in densities}


def test_advise_rejects_bad_input(advised, make_tiny_model, tokenizer) -> None:
    model = make_tiny_model(seed=0, dtype=torch.float32)
    adapters, tasks = advised["adapters"], advised["tasks"]
    with pytest.raises(ValueError, match="at least two adapters"):
        advise(model, tokenizer, {"topic": adapters["topic"]}, tasks)
    with pytest.raises(ValueError, match="unknown merge method 'avg'"):
        advise(model, tokenizer, adapters, tasks, methods=["avg"])
    with pytest.raises(ValueError, match="no sample texts"):
        advise(model, tokenizer, adapters, tasks[:1])
    with pytest.raises(ValueError, match="budget"):
        advise(model, tokenizer, adapters, tasks, budget=-1)
    swapped = {"sentiment": adapters["sentiment"], "topic": adapters["sentiment"]}
    with pytest.raises(ValueError, match="head has 2 classes"):
        advise(model, tokenizer, swapped, tasks)


@pytest.mark.slow
def test_cli_advise_on_plain_peft_adapters(peft_files, tiny_model_dir, tmp_path) -> None:
    args = [sys.executable, "-m", "osrm_core.cli", "advise", "--model", str(tiny_model_dir), "--json",
            "--out", str(tmp_path / "adv"), "--lambdas", "0.5", "1.0", "--densities", "0.5", "--budget", "4",
            "--max-length", "32"]
    for k in TASKS:
        args += ["--adapter", f"{k}={peft_files[f'adapter_{k}']}", "--task", f"{k}={peft_files[f'csv_{k}']}"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["recommended"]["method"] in ("task_arithmetic", "ties")
    assert (tmp_path / "adv" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "adv" / "advice.json").read_text())["reason"] == payload["reason"]
    bad = subprocess.run([*args, "--budget", "-3"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1


def test_layer_verdicts_sum_rank_and_name_the_dominant_pair() -> None:
    from osrm_core.diagnostics import layer_verdicts

    rows = []
    # layer "x.1.q": b on a carries 3 of 4 units of cross shift; layer "x.0.q": 1 unit in all.
    for layer, ab, ba, after in (("x.0.q", 0.5, 0.5, 0.1), ("x.1.q", 3.0, 1.0, 3.0)):
        for init in ("uploaded", "posthoc_osrm"):
            for adapter, data, shift in (("a", "a", 2.0), ("b", "b", 2.0), ("a", "b", ba), ("b", "a", ab)):
                if init == "posthoc_osrm" and adapter != data:
                    shift = after / 2
                rows.append({"layer": layer, "adapter": adapter, "data": data, "input_energy": 4.0 * shift,
                             "relative_shift": shift, "init": init})
    kept = pd.DataFrame({"adapter": ["a", "b"] * 2, "layer": ["x.0.q"] * 2 + ["x.1.q"] * 2,
                         "energy_kept": [0.8, 0.6, 0.2, 0.4]})
    v = layer_verdicts(pd.DataFrame(rows), kept)
    assert list(v["layer"]) == ["x.1.q", "x.0.q"] and list(v["rank"]) == [1, 2]
    top = v.iloc[0]
    assert top["cross_shift"] == pytest.approx(4.0) and top["own_shift"] == pytest.approx(4.0)
    assert (top["top_adapter"], top["top_data"], top["top_share"]) == ("b", "a", pytest.approx(0.75))
    assert top["top_input_norm"] == pytest.approx(np.sqrt(12.0))
    assert top["removed_by_posthoc"] == pytest.approx(0.25) and top["kept_by_posthoc"] == pytest.approx(0.3)
    low = v.iloc[1]
    assert low["removed_by_posthoc"] == pytest.approx(0.9) and low["kept_by_posthoc"] == pytest.approx(0.7)
    with pytest.raises(ValueError, match="interference needs columns"):
        layer_verdicts(pd.DataFrame(rows).drop(columns="init"), kept)

    from osrm_core.advisor import layer_notes

    notes = layer_notes(v)
    assert notes[0].startswith("1. L1 (q):") and "mostly b on a (75% at L1.q)" in notes[0]
    assert "remove 90% of it and keep 70%" in notes[1] and notes[1].endswith("projecting is worth it here.")


def test_advice_has_a_verdict_per_layer(advised) -> None:
    advice = advised["advice"]
    assert len(advice.layers) == 4 and set(advice.layers["rank"]) == {1, 2, 3, 4}
    saved = json.loads((advised["out"] / "advice.json").read_text())
    assert len(saved["layer_notes"]) == 2 and saved["layer_notes"][0].startswith("1. L")
    assert "## Interference per layer" in (advised["out"] / "advice.md").read_text()


def test_advise_verdicts_from_projected_statistics_equal_the_dense_ones(default_model, tmp_path) -> None:
    from osrm_core.models import load_base_model
    from osrm_core.task_spec import parse_task_spec

    files = _peft_files(tmp_path, lambda classes: load_base_model(num_labels=classes)[0])
    model, tokenizer = copy.deepcopy(default_model[0]).double(), default_model[1]  # W0 h in float64 too
    adapters = {k: load_adapter(files[f"adapter_{k}"], model) for k in TASKS}
    tasks = [parse_task_spec(str(files[f"csv_{k}"]), name=k) for k in TASKS]
    runs = {stats: advise(model, tokenizer, adapters, tasks, methods=("task_arithmetic",), lambdas=(1.0,), budget=0,
                          max_length=24, stats=stats) for stats in ("projected", "dense")}
    got, ref = runs["projected"].layers, runs["dense"].layers
    assert len(got) == 12 and list(got["layer"]) == list(ref["layer"])
    assert (got[["top_adapter", "top_data", "rank"]] == ref[["top_adapter", "top_data", "rank"]]).all().all()
    numbers = ["cross_shift", "own_shift", "cross_to_own", "top_share", "top_input_norm"]
    np.testing.assert_allclose(got[numbers].to_numpy(float), ref[numbers].to_numpy(float), rtol=1e-10, atol=0)
    assert got["removed_by_posthoc"].isna().all() and ref["removed_by_posthoc"].between(0, 1).all()
    assert runs["projected"].settings["stats"] == "projected" and runs["dense"].settings["stats"] == "dense"
    assert runs["projected"].notes == ["per-layer verdicts from projected statistics: post-hoc OSRM left out (it "
                                       "needs the d x d moments; --stats dense)"] and runs["dense"].notes == []
    assert all("; post-hoc OSRM would remove" not in note for note in layer_notes(got))
    assert all("; post-hoc OSRM would remove" in note for note in layer_notes(ref))


def test_advise_leaves_regmean_out_when_its_grams_do_not_fit(advised, make_tiny_model, tokenizer, monkeypatch,
                                                            tmp_path) -> None:
    import osrm_core.memory

    monkeypatch.setattr(osrm_core.memory, "available_bytes", lambda device="cpu": 1000)
    monkeypatch.setattr(osrm_core.memory, "dense_delta_bytes", lambda adapters: 0)  # the full-space search fits
    model = make_tiny_model(seed=0, dtype=torch.float32)
    advice = advise(model, tokenizer, advised["adapters"], advised["tasks"], methods=("task_arithmetic", "regmean"),
                    lambdas=(1.0,), budget=0, max_length=32)  # auto: dense does not fit either
    assert advice.settings["stats"] == "projected" and advice.settings["methods"] == ["task_arithmetic"]
    assert set(advice.search["method"]) == {"task_arithmetic"}
    assert [n.split(":")[0] for n in advice.notes] == ["dense statistics of 2 tasks needs 0.0 GiB, 0.0 GiB available",
                                                       "regmean left out", "per-layer verdicts from projected statistics"]
    assert "use --stats-dtype float32" in advice.notes[1]
    write_advice(advice, advised["adapters"], tmp_path)
    assert "Note: regmean left out: RegMean's Gram matrices of 2 tasks needs" in (tmp_path / "advice.md").read_text()
    with pytest.raises(ValueError, match=r"^dense statistics of 2 tasks needs .* use --stats projected"):
        advise(model, tokenizer, advised["adapters"], advised["tasks"], stats="dense")


def test_advise_searches_in_core_space_when_the_full_space_deltas_do_not_fit(advised, make_tiny_model, tokenizer,
                                                                            monkeypatch, tmp_path) -> None:
    """Issue 26: where the dense deltas' copies do not fit, ``auto`` searches on the LoRA
    factors' cores: the same candidates and scores as the full-space search for the
    basis-invariant methods, RegMean left out, the advised adapter factored and loadable by
    plain peft; ``space="full"`` is refused in one line."""
    import osrm_core.memory
    from osrm_core.advisor import merge_command
    from osrm_core.merge import LoraFactors

    model = make_tiny_model(seed=0, dtype=torch.float32)
    kwargs = dict(methods=("task_arithmetic", "tsv_m", "regmean"), lambdas=(0.5, 1.0), budget=0, max_length=32)
    full = advise(model, tokenizer, advised["adapters"], advised["tasks"], space="full", **kwargs)
    monkeypatch.setattr(osrm_core.memory, "available_bytes", lambda device="cpu": 1000)
    monkeypatch.setattr(osrm_core.memory, "dense_stats_bytes", lambda *a, **k: 0)  # the statistics still fit
    monkeypatch.setattr(osrm_core.memory, "regmean_solve_bytes", lambda shapes: 0)
    monkeypatch.setattr(osrm_core.memory, "eig_work_bytes", lambda widths, tasks: 0)
    core = advise(model, tokenizer, advised["adapters"], advised["tasks"], **kwargs)
    assert (full.settings["space"], core.settings["space"]) == ("full", "core")
    assert core.settings["methods"] == ["task_arithmetic", "tsv_m"] and "regmean" in full.settings["methods"]
    assert [n.split(":")[0] for n in core.notes] == ["the full-space deltas of 2 adapters needs 0.0 GiB, 0.0 GiB "
                                                     "available", "regmean left out"]
    assert "searching in core space" in core.notes[0] and "use --space core" in core.notes[0]
    same = full.search[full.search["method"] != "regmean"].reset_index(drop=True)
    pd.testing.assert_frame_equal(core.search.drop(columns="evaluation"), same.drop(columns="evaluation"),
                                  check_exact=False, atol=1e-9)
    assert all(isinstance(f, LoraFactors) for f in core.merged.values())
    out = write_advice(core, advised["adapters"], tmp_path)
    assert merge_command(core, advised["adapters"]).endswith("--space core --out merged/")
    assert _plain_peft_heldout_scores(out, advised["tasks"], make_tiny_model, tokenizer) == pytest.approx(
        core.recommended["heldout_per_task"])
    with pytest.raises(ValueError, match=r"^the full-space deltas of 2 adapters needs .* use --space core"):
        advise(model, tokenizer, advised["adapters"], advised["tasks"], space="full", **kwargs)


def _texts(task) -> set:
    return set(zip(task.test.text, task.test.text_pair or [None] * len(task.test)))


def test_held_out_texts_are_never_training_texts_nor_in_both_shares(tmp_path) -> None:
    """Issue 23: a task folder is scored on its test split only; a single file and uploaded
    texts are split once, without copies; no exact text lands in both shares on any path."""
    from app_helpers.uploads import text_task
    from osrm_core.task_spec import parse_task_spec

    real = REAL_DATA / "trec"
    if not real.is_dir():
        pytest.skip(f"no real task data at {REAL_DATA}")
    folder = parse_task_spec(str(real), name="trec")
    v, h, idx = split_samples(folder, 0.5, seed=0)
    assert idx["split"] == "test"
    train = set(zip(folder.train.text, [None] * len(folder.train)))
    test = set(zip(folder.test.text, [None] * len(folder.test)))
    assert test & train  # trec repeats some questions across its splits: those are left out
    assert _texts(v).isdisjoint(_texts(h)) and _texts(v) | _texts(h) == test - train
    with pytest.warns(UserWarning, match="training texts"):
        assert split_samples(folder, 0.5, seed=0, use_train=True)[2]["split"] == "train+test"

    rows = pd.read_csv(real / "test.csv", keep_default_na=False).head(40)
    dupes = pd.concat([rows, rows.head(10)])  # a file that repeats texts
    (tmp_path / "one.csv").write_text(dupes.to_csv(index=False))
    single = parse_task_spec(str(tmp_path / "one.csv"), name="one")
    v, h, idx = split_samples(single, 0.5, seed=0)
    assert idx["split"].endswith("one.csv") and _texts(v).isdisjoint(_texts(h))
    assert len(idx["validation"]) + len(idx["heldout"]) == rows["text"].nunique()

    upload = text_task("up", list(dupes["text"]), list(dupes["label"]))
    v, h, idx = split_samples(upload, 0.5, seed=0)
    assert idx["split"] == "upload" and _texts(v).isdisjoint(_texts(h))
    assert len(idx["validation"]) + len(idx["heldout"]) == rows["text"].nunique()


def test_choice_keeps_task_arithmetic_unless_a_candidate_wins_by_the_margin() -> None:
    from osrm_core.advisor import choose, reason, selection_margin

    assert selection_margin([("accuracy", 20)] * 3) == pytest.approx(1.96 * np.sqrt(3 * 0.25 / 20) / 3)
    assert selection_margin([("loss", 20)]) == 0.0
    rows = [("task_arithmetic", np.nan, "1/1", "default", 0.80, 0.82),
            ("task_arithmetic", np.nan, "0.5/0.5", "grid", 0.83, 0.85),
            ("ties", 0.3, "0.7/0.7", "grid", 0.86, 0.79),
            ("ties", 0.3, "0.7/0.5", "weights", 0.95, 0.80)]
    summary = pd.DataFrame([{"candidate": k, "method": m, "density": d, "weights": w, "origin": o, "validation": v,
                             "score": sc, "low": sc - 0.04, "high": sc + 0.04, "normalized": sc / 0.9}
                            for k, (m, d, w, o, v, sc) in enumerate(rows)])
    assert int(choose(summary, 0.15)["candidate"]) == 1  # TA's best lambda; 0.95 is not 15 points above 0.83
    assert int(choose(summary, 0.10)["candidate"]) == 3  # 0.95 is; 0.86 is not
    assert int(choose(summary, 0.0)["candidate"]) == 3
    assert int(choose(summary.drop(index=1), 0.15)["candidate"]) == 0  # the plain default
    kept = reason(summary, choose(summary, 0.15), 0.15)
    assert kept.startswith("task_arithmetic, lambda 0.5: task arithmetic's best lambda") and "15.0 points" in kept
    assert "3.0 points above the plain default" in kept
    moved = reason(summary, choose(summary, 0.10), 0.10)
    assert moved.startswith("ties (density 0.3), per-adapter weights 0.7/0.5:") and "2.0 points below the plain" in moved
    assert "-" not in moved.split("held-out")[-1]  # no "-2.0 points over"


@pytest.mark.slow
@pytest.mark.parametrize("recommended", [None, {"method": "ties", "density": 0.5, "weights": [0.5, 1.5]},
                                         {"method": "tsv_m", "density": None, "weights": [0.8, 0.8]}])
def test_advice_md_command_reproduces_the_adapter(advised, recommended, tmp_path) -> None:
    """Issue 24: ``advice.md`` prints the ``osrm merge`` command (with ``--weights`` when they
    differ) that writes the advised adapter again, exactly."""
    import dataclasses
    import shlex

    from osrm_core.adapters import read_adapter_dir
    from osrm_core.advisor import merge_command
    from osrm_core.export import merge_adapters

    advice, adapters = advised["advice"], advised["adapters"]
    if recommended is None:  # the advice as it came
        command = json.loads((advised["out"] / "advice.json").read_text())["command"]
        assert f"```bash\n{command}\n```" in (advised["out"] / "advice.md").read_text()
        want = advice.merged
    else:
        rec = {**advice.recommended, **recommended}
        params = {} if rec["density"] is None else {"density": rec["density"]}
        want = merge_adapters(adapters, rec["method"], weights=rec["weights"], **params)
        command = merge_command(dataclasses.replace(advice, recommended=rec), adapters)
        assert ("--weights sentiment=0.5,topic=1.5" in command) == (rec["method"] == "ties")
    argv = shlex.split(command.replace("--out merged/", f"--out {tmp_path / 'again'}"))
    result = subprocess.run([sys.executable, "-m", "osrm_core.cli", *argv[1:]], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    written = read_adapter_dir(tmp_path / "again")
    for layer, delta in want.items():
        torch.testing.assert_close(written.layers[layer].delta, delta.float(), atol=1e-5, rtol=1e-4)
