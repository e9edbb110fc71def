"""Tests of the ``osrm`` command line, run as a subprocess: bad input exits 2 with one
``error:`` line and no traceback; each subcommand writes what it says, on a tiny saved model."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest
import torch
import yaml
from _helpers import (
    B0,
    ENV,
    PICKLE_MESSAGE,
    _nan_at,
    _pickled,
    _zip,
    crash_files_fixture,  # noqa: F401  (the crash_files fixture)
    folder_files,
    osrm,
    variant,
)
from conftest import TINY_TARGETS

from osrm_core.adapters import LoraWeights, read_adapter_dir, write_adapter
from osrm_core.demo import demo_task
from osrm_core.rundir import RunDir
from osrm_core.settings import RunConfig

TASKS = ("sentiment", "paraphrase")
def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory, make_tiny_model):
    """Task CSVs and adapters for the tiny model (and some broken ones)."""
    root = tmp_path_factory.mktemp("cli")
    out = {"root": root}
    for key in TASKS:
        task = demo_task(key, n_train=20, n_test=10)
        frames = []
        for split in (task.train, task.test):
            frame = pd.DataFrame({"text": split.text, "label": split.label})
            if split.text_pair is not None:
                frame.insert(1, "text_pair", split.text_pair)
            frames.append(frame)
        out[key] = root / f"{key}.csv"
        pd.concat(frames).to_csv(out[key], index=False)
    out["no_label"] = root / "no_label.csv"
    pd.read_csv(out["sentiment"]).rename(columns={"label": "polarity"}).to_csv(out["no_label"], index=False)

    from peft import LoraConfig, get_peft_model

    for seed, key in enumerate(TASKS):  # made by plain peft, untrained, random B: a real delta each
        torch.manual_seed(seed)
        config = LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"])
        model = get_peft_model(make_tiny_model(dtype=torch.float32), config)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.copy_(torch.randn(p.shape, generator=gen))
        model.save_pretrained(root / "adapters" / key)
        out[f"adapter_{key}"] = root / "adapters" / key

    wide = {n: LoraWeights(torch.randn(2, 48), torch.randn(48, 2), 2.0) for n in TINY_TARGETS}
    out["adapter_wide"] = write_adapter(root / "adapters" / "wide", wide, {"peft_type": "LORA"})

    pickled = root / "adapters" / "pickled"
    pickled.mkdir()
    source = out["adapter_sentiment"]
    (pickled / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    from safetensors.torch import load_file

    torch.save(load_file(str(source / "adapter_model.safetensors")), pickled / "adapter_model.bin")
    out["adapter_pickled"] = pickled

    out["bad_yaml"] = root / "bad.yaml"
    out["bad_yaml"].write_text("name: x\ntasks: [\n")
    out["bad_method"] = root / "bad_method.yaml"
    out["bad_method"].write_text(yaml.safe_dump({
        "tasks": [{"name": k, "spec": f"demo:{k}"} for k in TASKS],
        "merge": {"methods": ["task_arithmetic", "averaging"]},
    }))
    out["bad_per_init"] = root / "bad_per_init.yaml"
    out["bad_per_init"].write_text(yaml.safe_dump({
        "tasks": [{"name": k, "spec": f"demo:{k}"} for k in TASKS],
        "inits": ["standard", "osrm_gen"],
        "per_init": {"standard": {"constraint": "project"}},
    }))
    return out


def _task_args(files) -> list[str]:
    return [a for key in TASKS for a in ("--task", f"{key}={files[key]}")]


def _adapter_args(files, a="adapter_sentiment", b="adapter_paraphrase") -> list[str]:
    return ["--adapter", f"sentiment={files[a]}", "--adapter", f"paraphrase={files[b]}"]


BAD_INPUTS = {
    "missing config": (lambda f, m: ["run", f["root"] / "missing.yaml"], "does not exist"),
    "invalid yaml": (lambda f, m: ["run", f["bad_yaml"]], "not valid YAML"),
    "per-init constraint the init cannot take": (
        lambda f, m: ["run", f["bad_per_init"]],
        "per_init.standard.constraint 'project' keeps A in the OSRM subspace, which init 'standard' has not"),
    "unknown merge method": (lambda f, m: ["run", f["bad_method"]], "unknown merge method 'averaging'"),
    "rank 0": (
        lambda f, m: ["stats", "--task", "a=demo:sentiment", "--task", "b=demo:topic", "--rank", "0",
                      "--out", f["root"] / "r0"],
        "--rank",
    ),
    "task without =": (
        lambda f, m: ["stats", "--task", "demo:sentiment", "--task", "b=demo:topic", "--out", f["root"] / "t"],
        "NAME=VALUE",
    ),
    "training on texts without labels": (
        lambda f, m: ["train", "--model", m, "--task", f"a={f['no_label']}", "--task", f"b={f['sentiment']}",
                      "--steps", "1", "--samples", "4", "--out", f["root"] / "nl"],
        "task 'a' has no labels; fine-tuning needs labelled data",
    ),
    "sweep on texts without labels": (
        lambda f, m: ["sweep", "--model", m, *_adapter_args(f), "--task", f"sentiment={f['no_label']}",
                      "--task", f"paraphrase={f['paraphrase']}"],
        "task 'sentiment' has no labels, so a classifier cannot be scored on it",
    ),
    "metric of an unknown task": (
        lambda f, m: ["sweep", "--model", m, *_adapter_args(f), *_task_args(f), "--metric", "nope=mcc"],
        "--metric nope=...: no --task of that name",
    ),
    "missing adapter": (
        lambda f, m: ["merge", "--adapter", f"sentiment={f['root'] / 'nowhere'}", "--adapter",
                      f"paraphrase={f['adapter_paraphrase']}", "--out", f["root"] / "m0"],
        "does not exist",
    ),
    "adapter of another model": (
        lambda f, m: ["diagnose", "--model", m, *_adapter_args(f, b="adapter_wide"), *_task_args(f)],
        "size mismatch",
    ),
    "pickled adapter": (
        lambda f, m: ["merge", *_adapter_args(f, a="adapter_pickled"), "--out", f["root"] / "m1"],
        "pickle",
    ),
    "merge --out an existing file": (
        lambda f, m: ["merge", *_adapter_args(f), "--out", f["bad_yaml"]],
        "is an existing file; give a folder",
    ),
    "negative lambda": (
        lambda f, m: ["merge", *_adapter_args(f), "--lambda", "-1", "--out", f["root"] / "neg"],
        "--lambda must be a number >= 0, got -1",
    ),
    "post-hoc rank 0": (
        lambda f, m: ["diagnose", *_adapter_args(f), *_task_args(f), "--posthoc-rank", "0"],
        "--posthoc-rank must be >= 1",
    ),
    "one task": (
        lambda f, m: ["stats", "--task", "a=demo:sentiment", "--out", f["root"] / "one"],
        "at least two tasks",
    ),
    "osrm_gen eps 0": (
        lambda f, m: ["train", "--task", "a=demo:sentiment", "--task", "b=demo:topic", "--init", "osrm_gen",
                      "--osrm-gen-eps", "0", "--out", f["root"] / "eps0"],
        "init_params: osrm_gen.eps must be a number in (0.0, inf), got 0.0",
    ),
    "negative penalty weight": (
        lambda f, m: ["train", "--task", "a=demo:sentiment", "--task", "b=demo:topic", "--constraint",
                      "penalty_ratio", "--penalty-beta", "-1", "--out", f["root"] / "beta"],
        "train.penalty_beta",
    ),
}


#: Merges scored by ``osrm merge --task`` and checked in plain peft: TIES and the spectral mergers.
SCORED_MERGES = {"ties": ["--density", 0.6], "tsv_m": [], "iso_c": [], "iso_cts": [], "cart": []}


def _run_config(files, model_dir) -> dict:
    return {
        "name": "tiny-cli",
        "model": str(model_dir),
        "tasks": [{"name": k, "spec": str(files[k])} for k in TASKS],
        "rank": 2,
        "alpha": 4,
        "samples": 8,
        "max_length": 32,
        "max_test": 8,
        "inits": ["standard", "osrm"],
        "train": {"steps": 2, "batch_size": 4},
        "merge": {"methods": ["task_arithmetic"], "lambdas": [0.5, 1.0]},
    }


@pytest.fixture(scope="module")
def jobs(files, tiny_model_dir):
    """Every command of this module, submitted at once to a few workers: each child spends
    seconds importing torch, and on a small shared machine they overlap well. Tests wait for
    their own job's ``CompletedProcess`` (or tuple of them) with ``jobs[name].result()``."""
    from concurrent.futures import ThreadPoolExecutor

    root, m = files["root"], tiny_model_dir
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(_run_config(files, m)))

    def run_then_show():
        run = osrm("run", config, "--out", root / "run", "--json")
        return run, osrm("show", root / "run")

    pool = ThreadPoolExecutor(max_workers=3)
    futures = {"run": pool.submit(run_then_show)}  # the longest first
    futures["diagnose"] = pool.submit(
        osrm, "diagnose", "--model", m, *_adapter_args(files), *_task_args(files), "--samples", 8, "--json"
    )
    futures["stats"] = pool.submit(
        osrm, "stats", "--model", m, *_task_args(files), "--samples", 8, "--max-length", 32,
        "--out", root / "stats-run", "--json",
    )
    futures["merge"] = pool.submit(
        osrm, "merge", *_adapter_args(files), "--method", "ties", "--lambda", 0.7, "--out", root / "merged"
    )
    for method, args in SCORED_MERGES.items():
        futures[f"merge_scored_{method}"] = pool.submit(
            osrm, "merge", "--model", m, *_adapter_args(files), *_task_args(files), "--lambda", 0.7,
            "--method", method, *args, "--out", root / f"merged-scored-{method}", "--json",
        )
    futures["sweep"] = pool.submit(
        osrm, "sweep", "--model", m, *_adapter_args(files), *_task_args(files), "--methods", "task_arithmetic",
        "ties", "--lambdas", 0.5, 1.0, "--densities", 0.5, "--max-test", 8, "--max-length", 32,
    )
    futures["help"] = pool.submit(osrm, "--help")
    for case, (make_args, _) in BAD_INPUTS.items():
        futures[case] = pool.submit(osrm, *make_args(files, m))
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_error_line(case, jobs) -> None:
    expected = BAD_INPUTS[case][1]
    result = jobs[case].result()
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert expected in errors[0]


#: Imported when a command uses them, not at the command line's start (each costs seconds).
SLOW_IMPORTS = ("peft", "transformers", "sklearn", "scipy", "plotly", "streamlit")


@pytest.mark.slow
def test_the_command_line_starts_without_the_slow_imports(tmp_path) -> None:
    """`osrm --help` and an argument error answer in about the time torch takes to import."""
    code = (
        "import sys\nfrom osrm_core.cli import main\n"
        f"code = main(['run', {str(tmp_path / 'missing.yaml')!r}])\n"
        f"print(code, sorted(m for m in {SLOW_IMPORTS!r} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert result.stdout.split() == ["2", "[]"], result.stderr
    assert "missing.yaml' does not exist" in result.stderr


@pytest.mark.slow
def test_help(jobs) -> None:
    result = jobs["help"].result()
    _ok(result)
    assert result.stdout.startswith("usage: osrm")
    for command in ("demo", "run", "stats", "train", "merge", "sweep", "diagnose", "show"):
        assert command in result.stdout
    from osrm_core.inits import INITS
    from osrm_core.merge import MERGE_METHODS

    merge_help, train_help = osrm("merge", "--help").stdout, osrm("train", "--help").stdout
    assert all(m in merge_help for m in MERGE_METHODS) and all(i in train_help for i in INITS)


@pytest.mark.slow
def test_stats(jobs, files) -> None:
    out = files["root"] / "stats-run"
    result = jobs["stats"].result()
    _ok(result)
    payload = json.loads(result.stdout)["stats"]
    assert sorted(payload) == sorted(TASKS)
    for key in TASKS:
        path = out / "stats" / f"{key}.safetensors"
        assert path.is_file() and payload[key]["path"] == str(path)
        assert payload[key]["tokens"] > 0 and payload[key]["layers"] == len(TINY_TARGETS)


@pytest.mark.slow
def test_merge(jobs, files) -> None:
    from osrm_core.export import merge_adapters

    out = files["root"] / "merged"
    result = jobs["merge"].result()
    _ok(result)
    assert str(out) in result.stdout
    written = read_adapter_dir(out)
    size, rank = (out / "adapter_model.safetensors").stat().st_size, next(iter(written.layers.values())).rank
    assert f"rank {rank} on {len(TINY_TARGETS)} layers (exact); adapter_model.safetensors {size / 2**20:.2f} MiB" \
        in result.stdout
    adapters = {k: read_adapter_dir(files[f"adapter_{k}"]) for k in TASKS}
    expected = merge_adapters(adapters, "ties", lam=0.7)
    for name, delta in expected.items():
        torch.testing.assert_close(written.layers[name].delta, delta, atol=1e-5, rtol=0)
    for key in TASKS:
        assert (out / "heads" / f"{key}.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("method", list(SCORED_MERGES))
def test_merge_with_tasks_reports_scores_plain_peft_reproduces(method, jobs, files, tiny_model_dir) -> None:
    """``osrm merge --task`` measures the merge on each task, prints the scores and writes them
    into the model card; the merged folder loaded with plain peft on the base, with a task's
    head from ``heads/``, scores exactly that."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from osrm_core.evaluate import evaluate_model
    from osrm_core.task_spec import parse_task_spec

    out = files["root"] / f"merged-scored-{method}"
    result = jobs[f"merge_scored_{method}"].result()
    _ok(result)
    scores = {r["task"]: r for r in json.loads(result.stdout)["scores"]}
    assert sorted(scores) == sorted(TASKS)
    card = (out / "README.md").read_text()
    assert "## Measured scores" in card and "max_length = 128; seed = 0" in card
    assert f"`{method}` with lambda = 0.7" in card and "num_labels=K)  # K: " in card
    assert ("density = 0.6" in card) == (method == "ties")
    assert "per layer (exact)" in card and ("its merge is full rank" in card) == (method == "ties")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for key in TASKS:
        row = scores[key]
        assert row["metric"] == "accuracy" and row["normalized"] == pytest.approx(row["score"] / row["single"])
        task = parse_task_spec(str(files[key]), name=key, seed=0)
        assert f"| {key} | accuracy | {len(task.test)} | {row['score']:.4f} | {row['single']:.4f} |" in card
        base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
        model = PeftModel.from_pretrained(base, str(out)).eval()
        model.get_base_model().load_state_dict(load_file(str(out / "heads" / f"{key}.safetensors")), strict=False)
        assert evaluate_model(model, tokenizer, task) == pytest.approx(row["score"])


@pytest.mark.slow
def test_sweep_per_task_table_has_no_empty_rows(jobs) -> None:
    """Issue 23: task arithmetic has no density, TIES one; the pivot made all-NaN rows of the
    pairs a method lacks."""
    result = jobs["sweep"].result()
    _ok(result)
    table = result.stdout.split("per-task scores of the merge:")[1].split("best point per method")[0]
    rows = [line.split() for line in table.strip().splitlines()[2:] if line.strip()]
    assert len(rows) == 4, table  # 2 lambdas of task arithmetic, 2 of TIES at one density
    assert all(float(x) == float(x) for row in rows for x in row[-2:]), table  # every score a number


@pytest.mark.slow
def test_diagnose_json(jobs) -> None:
    result = jobs["diagnose"].result()
    _ok(result)
    payload = json.loads(result.stdout)
    assert set(payload) == {"interference", "matrix", "angles", "own_energy", "posthoc", "coverage",
                            "sv_interference", "spectra", "spectrum", "verdicts", "layer_notes"}
    assert all(payload[key] for key in payload)
    assert {row["adapter"] for row in payload["posthoc"]} == set(TASKS)


def test_diagnose_posthoc_rank_defaults_to_the_adapters_rank() -> None:
    from osrm_core.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["diagnose"]).posthoc_rank is None
    assert parser.parse_args(["diagnose", "--posthoc-rank", "4"]).posthoc_rank == 4
    assert parser.parse_args(["stats"]).rank == 8


def test_diagnose_refuses_a_negative_sketch_power(capsys) -> None:
    from osrm_core.cli import main

    assert main(["diagnose", "--stats", "projected", "--angles", "sketch", "--sketch-power", "-1"]) == 2
    assert capsys.readouterr().err == "error: --sketch-power must be >= 0, got -1\n"


def test_diagnose_plans_again_with_the_model_loaded(files, tiny_model_dir, monkeypatch, capsys) -> None:
    """Issue 26: the statistics are planned before loading the model (refusing dense early) and
    again after it, the model's weights then counted: auto turns to projected statistics."""
    import osrm_core.memory
    from osrm_core.cli import main

    free = iter([10**12])  # room before loading the model, none once it is loaded
    monkeypatch.setattr(osrm_core.memory, "available_bytes", lambda device="cpu": next(free, 1000))
    argv = ["diagnose", "--model", str(tiny_model_dir), *_adapter_args(files), *_task_args(files), "--samples", "8"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "note: dense statistics of 2 tasks needs 0.0 GiB, 0.0 GiB available" in err
    assert "collecting projected statistics" in err


def test_merge_in_full_space_that_does_not_fit_is_refused_before_any_work(files, monkeypatch, capsys,
                                                                          tmp_path) -> None:
    import osrm_core.memory
    from osrm_core.cli import main

    monkeypatch.setattr(osrm_core.memory, "available_bytes", lambda device="cpu": 1000)
    assert main(["merge", *_adapter_args(files), "--out", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the full-space deltas of 2 adapters needs ") and "use --space core" in err
    assert err.count("\n") == 1 and not (tmp_path / "full").exists()
    assert main(["merge", *_adapter_args(files), "--space", "core", "--out", str(tmp_path / "core")]) == 0
    assert (tmp_path / "core" / "adapter_model.safetensors").is_file()
    assert main(["sweep", *_adapter_args(files), *_task_args(files), "--lambdas", "1"]) == 2
    assert "the full-space deltas of 2 adapters needs " in capsys.readouterr().err


def test_sweep_in_core_space_scores_task_arithmetic_as_the_full_space_sweep(files, tiny_model_dir, capsys) -> None:
    """``osrm sweep --space core`` holds no dense delta; task arithmetic and TSV-M are the same
    merges in both spaces, so their scores agree; RegMean is refused in core space."""
    from osrm_core.cli import main

    argv = ["sweep", "--model", str(tiny_model_dir), *_adapter_args(files), *_task_args(files), "--lambdas", "0.5",
            "1", "--json"]
    scores = {}
    for space in ("full", "core"):
        assert main([*argv, "--methods", "task_arithmetic", "tsv_m", "--space", space]) == 0
        scores[space] = pd.DataFrame(json.loads(capsys.readouterr().out)["sweep"])
    pd.testing.assert_frame_equal(scores["core"], scores["full"])
    assert main([*argv, "--methods", "regmean", "--space", "core"]) == 2
    assert "--space core does not support regmean" in capsys.readouterr().err


@pytest.mark.slow
def test_run_and_show(jobs, files, tiny_model_dir) -> None:
    out = files["root"] / "run"
    result, shown = jobs["run"].result()
    _ok(result)
    summary = json.loads(result.stdout)
    assert summary["run_dir"] == str(out) and summary["tasks"] == list(TASKS)
    assert set(summary["results"]) == {"standard", "osrm"}
    assert json.loads((out / "manifest.json").read_text())["status"] == "done"
    assert RunConfig.from_yaml(out / "config.yaml") == RunConfig.validate_dict(_run_config(files, tiny_model_dir))

    _ok(shown)
    assert "[osrm] single-task:" in shown.stdout and "[standard] task_arithmetic: best lambda=" in shown.stdout
    assert RunDir(out).summary() == {k: v for k, v in summary.items() if k != "run_dir"}


MERGE_BAD = {
    "weight not a number": (["--weights", "sentiment=abc"], "--weights: weight of 'sentiment' must be a finite number"),
    "negative weight": (["--weights", "sentiment=-1"], "must be a finite number >= 0, got '-1'"),
    "weight of no adapter": (["--weights", "nope=1"], "--weights: no adapter named 'nope'; adapters are sentiment"),
    "weights without =": (["--weights", "sentiment"], "use --weights NAME=W,NAME=W"),
    "regmean in core space": (["--method", "regmean", "--space", "core"], "--space core does not support"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MERGE_BAD))
def test_merge_bad_weights_or_space_exit_2(case, files) -> None:
    args, expected = MERGE_BAD[case]
    result = osrm("merge", *_adapter_args(files), *args, "--out", files["root"] / "bad-merge")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr


@pytest.mark.slow
def test_merge_new_methods_weights_core_space_and_rank_note(files) -> None:
    """``--method tsv_m --weights`` and ``--method iso_c --space core`` write the merge at its
    numerical rank (exact, no note); TIES, full rank, gets a note of its rank and size."""
    from osrm_core.export import merge_adapters

    adapters = {k: read_adapter_dir(files[f"adapter_{k}"]) for k in TASKS}
    together = max(sum(a.layers[n].rank for a in adapters.values() if n in a.layers)
                   for n in adapters["sentiment"].layers)
    runs = {
        "tsv": (["--method", "tsv_m", "--weights", "sentiment=0.5,paraphrase=1.5"], "tsv_m", [0.5, 1.5], "full"),
        "iso": (["--method", "iso_c", "--space", "core", "--weights", "paraphrase=2"], "iso_c", [1.0, 2.0], "core"),
    }
    for key, (args, method, weights, space) in runs.items():
        out = files["root"] / f"merged-{key}"
        result = osrm("merge", *_adapter_args(files), *args, "--lambda", 0.7, "--out", out, "--json")
        _ok(result)
        payload = json.loads(result.stdout)
        assert payload["rank"] <= together and "note" not in payload
        written = read_adapter_dir(out)
        expected = merge_adapters(adapters, method, lam=0.7, weights=weights, space=space)
        for name, delta in expected.items():
            delta = delta.delta() if space == "core" else delta
            torch.testing.assert_close(written.layers[name].delta, delta, atol=1e-5, rtol=0)
        assert f"weights = {weights}" in (out / "README.md").read_text()
    result = osrm("merge", *_adapter_args(files), "--method", "ties", "--out", files["root"] / "merged-ties-note")
    _ok(result)
    assert "note: ties gives a delta of rank" in result.stdout and f"have rank {together} together" in result.stdout


# --------------------------------------------------------------------------- hostile adapters and data


@pytest.fixture(scope="module")
def hostile_jobs(crash_files, tiny_model_dir, good_adapter):
    """Hostile adapters and data through the command line, started together in the background
    (each child spends seconds importing torch)."""
    root = crash_files["root"]
    pickled = _pickled(good_adapter, root / "pickled")
    nan = _zip(root / "nan", folder_files(variant(good_adapter, root / "nan_dir", edit=_nan_at(B0, float("nan")))))
    evil = _zip(root / "evil", {"../evil": b"1"})
    tasks = ["--task", f"sentiment={root / 'sentiment.csv'}", "--task", f"topic={root / 'topic.csv'}"]
    diagnose = ["diagnose", "--model", tiny_model_dir, *tasks, "--adapter", f"b={good_adapter}"]
    pool = ThreadPoolExecutor(max_workers=2)
    jobs = {
        "pickled": pool.submit(osrm, *diagnose, "--adapter", f"a={pickled}"),
        "nan": pool.submit(osrm, *diagnose, "--adapter", f"a={nan}"),
        "evil": pool.submit(osrm, *diagnose, "--adapter", f"a={evil}"),
        "data": pool.submit(osrm, "stats", "--model", tiny_model_dir, "--task", f"a={root / 'fractional.csv'}",
                            "--task", f"b={root / 'topic.csv'}", "--out", root / "stats"),
    }
    yield jobs
    pool.shutdown(wait=True, cancel_futures=True)


CLI_CASES = {
    "pickled": "error: pickled: " + PICKLE_MESSAGE.format("")[2:],
    "nan": f"error: nan.zip: tensor '{B0}' has NaN or Inf values",
    "evil": "error: evil.zip: archive member '../evil' leaves the archive folder ('..')",
    "data": "error: a: label '0.5' is not an integer; labels must be integers 0..K-1 or class names",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CLI_CASES))
def test_command_line_exits_2_with_the_message(case, hostile_jobs):
    result = hostile_jobs[case].result()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [CLI_CASES[case]]
