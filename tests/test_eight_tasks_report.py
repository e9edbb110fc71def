"""reports/eight-tasks/analyze.py: merges of fixed task subsets per arm, resumable CSVs, the
summary at the best lambda per subset, and scores that match the sweep stage's on a finished run."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest
from fixtures_run import SMALL_TASKS, small_run_fixture  # noqa: F401

from osrm_core.rundir import RunDir
from osrm_core.settings import MergeSettings, RunConfig, TaskEntry

SCRIPT = Path(__file__).parents[1] / "reports" / "eight-tasks" / "analyze.py"


@pytest.fixture(scope="module")
def analyze():
    spec = importlib.util.spec_from_file_location("eight_tasks_analyze", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


TASKS = ("a", "b", "c", "d")
SUBSETS = {2: [("a", "b"), ("c", "d")], 4: [TASKS]}


def _fake_run(path: Path, init: str, rank: int, status: str | None = "done", tasks=TASKS) -> None:
    """A run directory with a config, a manifest and empty adapter folders (with train.json)."""
    config = RunConfig(name=path.name, tasks=[TaskEntry(name=t, spec=f"demo:{t}") for t in TASKS], inits=[init],
                       rank=rank, merge=MergeSettings(methods=["task_arithmetic"], lambdas=[0.5, 1.0, 2.0]))
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(config.to_yaml())
    (path / "manifest.json").write_text(json.dumps({"stages": {}, **({"status": status} if status else {})}))
    for t in tasks:
        (path / "adapters" / init / t).mkdir(parents=True)
        (path / "adapters" / init / t / "train.json").write_text(json.dumps({"test_score": 0.9}))


class FakeScorer:
    """Scores that peak at lambda 1 (the arm's rank moves the level), counting its calls."""

    calls: list = []

    def __init__(self, arm) -> None:
        self.arm = arm

    def single(self, names):
        FakeScorer.calls.append(("single", self.arm.name, tuple(names)))
        return {n: 0.8 + 0.01 * i for i, n in enumerate(names)}

    def merged(self, names, method, lambdas, densities, single):
        FakeScorer.calls.append((method, self.arm.name, tuple(names), tuple(lambdas)))
        rows = []
        for lam in lambdas:
            for n in names:
                score = single[n] * (1 - 0.1 * abs(lam - 1) - 0.02 * len(names)) * (1 + 0.001 * self.arm.config.rank)
                rows.append({"method": method, "density": 0.5 if method == "ties" else None, "lambda": lam,
                             "task": n, "metric": "accuracy", "score": score, "single": single[n],
                             "normalized": score / single[n]})
        return pd.DataFrame(rows)


def test_finished_arms_are_the_done_runs_of_every_folder(analyze, tmp_path) -> None:
    _fake_run(tmp_path / "study" / "runs" / "standard-none-r8", "standard", 8)
    _fake_run(tmp_path / "study" / "runs" / "training", "osrm_gen", 32, status=None)
    _fake_run(tmp_path / "extra-run", "standard", 32)
    _fake_run(tmp_path / "other" / "runs" / "standard-none-r8", "standard", 8)
    arms = analyze.finished_arms([tmp_path / "study", tmp_path / "extra-run", tmp_path / "other"])
    assert [a.name for a in arms] == ["standard-none-r8", "extra-run", "other/standard-none-r8"]
    assert arms[0].tags()["rank"] == 8 and arms[1].tasks() == set(TASKS)
    # --partial: a run still training counts with the adapters its manifest records as done
    training = tmp_path / "study" / "runs" / "training"
    (training / "manifest.json").write_text(json.dumps({"stages": {"adapters/osrm_gen/a": {"status": "done"},
                                                                   "adapters/osrm_gen/b": {"status": "running"}}}))
    partial = analyze.finished_arms([tmp_path / "study"], partial=True)
    assert [a.name for a in partial] == ["standard-none-r8", "training"] and partial[1].tasks() == {"a"}


def test_scores_are_resumed_and_summarized_at_the_best_lambda(analyze, tmp_path) -> None:
    _fake_run(tmp_path / "study" / "runs" / "r8", "standard", 8)
    _fake_run(tmp_path / "study" / "runs" / "r32", "standard", 32, tasks=("a", "b", "c"))  # no adapter of d
    arms = analyze.finished_arms([tmp_path / "study"])
    FakeScorer.calls = []
    out = tmp_path / "out"
    single, merges = analyze.score_all(arms, out, methods=["task_arithmetic", "ties"], subsets=SUBSETS,
                                       scorer=FakeScorer, log=lambda m: None)
    assert set(single["arm"]) == {"r8", "r32"} and len(single) == 4 + 3
    assert (single["train_score"] == 0.9).all()
    # r32 merges only the pair it has all adapters of; each row once
    assert set(merges.loc[merges["arm"] == "r32", "subset"]) == {"a+b"}
    assert len(merges) == 2 * 3 * (2 + 2 + 4) + 2 * 3 * 2
    assert not merges.duplicated(analyze.MERGE_KEY).any()
    assert merges.loc[merges["method"] == "task_arithmetic", "density"].isna().all()

    # Run again: nothing is scored; with one more lambda only that lambda is.
    FakeScorer.calls = []
    analyze.score_all(arms, out, methods=["task_arithmetic", "ties"], subsets=SUBSETS, scorer=FakeScorer,
                      log=lambda m: None)
    assert FakeScorer.calls == []
    _, grown = analyze.score_all(arms, out, methods=["task_arithmetic"], lambdas=[0.5, 1.0, 2.0, 3.0],
                                 subsets=SUBSETS, scorer=FakeScorer, log=lambda m: None)
    assert {c[3] for c in FakeScorer.calls} == {(3.0,)} and len(FakeScorer.calls) == 3 + 1
    assert len(grown) == len(merges) + 2 + 2 + 4 + 2
    assert len(pd.read_csv(out / "tables" / "merges.csv")) == len(grown)

    tables = analyze.write_outputs(out, merges)
    best, summary = tables["best_per_subset"], tables["summary"]
    assert (best["best_lambda"] == 1.0).all() and not best["at_edge"].any()
    row = summary[(summary["arm"] == "r8") & (summary["method"] == "ties") & (summary["n_tasks"] == 2)].iloc[0]
    expected = merges.query("arm == 'r8' and method == 'ties' and n_tasks == 2 and `lambda` == 1.0")
    assert row["subsets"] == 2 and row["edge_subsets"] == 0 and row["best_lambdas"] == "1;1"
    assert math.isclose(row["merged_avg"], expected.groupby("subset")["score"].mean().mean())
    assert math.isclose(row["normalized_avg"], expected.groupby("subset")["normalized"].mean().mean())
    assert math.isclose(row["normalized_avg"], (1 - 0.04) * 1.008)
    html = (out / "figures" / "scaling.html").read_text()
    assert "task_arithmetic: plain merged average" in html and "ties: normalized score" in html


def test_a_best_lambda_at_the_grid_edge_is_flagged(analyze) -> None:
    rows = [{"arm": "x", "method": "ta", "density": None, "n_tasks": 2, "subset": "a+b", "lambda": lam, "task": t,
             "score": lam, "single": 1.0, "normalized": lam} for lam in (0.5, 1.0, 2.0) for t in ("a", "b")]
    best = analyze.best_per_subset(pd.DataFrame(rows))
    assert best["best_lambda"].tolist() == [2.0] and best["at_edge"].tolist() == [True]
    assert analyze.summarize(best)["edge_subsets"].tolist() == [1]


def test_the_lambda_is_chosen_on_the_selection_share_and_reported_on_the_other(analyze) -> None:
    """Where a subset was also scored on the selection share, its best point is chosen there and
    the report share's scores at that point are reported; the report share's own best (the
    optimistic figure) is kept beside it. Older tables without shares are report rows."""
    def rows(share, peak):
        return [{"arm": "x", "share": share, "method": "ta", "density": None, "n_tasks": 2, "subset": "a+b",
                 "lambda": lam, "task": t, "score": 1 - abs(lam - peak) / 10, "single": 1.0,
                 "normalized": 1 - abs(lam - peak) / 10} for lam in (0.5, 1.0, 2.0, 3.0) for t in ("a", "b")]

    best = analyze.best_per_subset(pd.DataFrame(rows("report", 1.0) + rows("select", 2.0)))
    assert best[["best_lambda", "selected_on", "at_edge"]].values.tolist() == [[2.0, "select", False]]
    assert best["merged_avg"].item() == pytest.approx(0.9) and best["report_best_avg"].item() == pytest.approx(1.0)
    alone = analyze.best_per_subset(pd.DataFrame(rows("report", 1.0)).drop(columns="share"))
    assert alone[["best_lambda", "selected_on"]].values.tolist() == [[1.0, "report"]]
    assert analyze.summarize(best)["selected_on"].tolist() == ["select"]
    only_select = analyze.best_per_subset(pd.DataFrame(rows("select", 2.0)))
    assert only_select.empty and analyze.summarize(only_select).empty  # nothing to report yet


def test_seeds_of_a_variant_are_summarized_together(analyze) -> None:
    summary = pd.DataFrame([
        {"arm": f"std-r8-s{seed}", "method": "ta", "n_tasks": 8, "merged_avg": m, "normalized_avg": m / 0.8,
         "single_avg": 0.8, "selected_on": on} for seed, m, on in ((0, 0.56, "select"), (1, 0.60, "report"),
                                                                   (2, 0.52, "report"))
    ] + [{"arm": "recipe-s0", "method": "ta", "n_tasks": 8, "merged_avg": 0.75, "normalized_avg": 0.97,
          "single_avg": 0.77, "selected_on": "report"}])
    seeds = analyze.over_seeds(summary).set_index("variant")
    assert seeds.loc["std-r8", "seeds"] == 3 and seeds.loc["std-r8", "seed_list"] == "0;1;2"
    assert seeds.loc["std-r8", ["merged_avg_mean", "merged_avg_min", "merged_avg_max"]].tolist() == \
        pytest.approx([0.56, 0.52, 0.60])
    assert seeds.loc["recipe", "seeds"] == 1 and seeds.loc["recipe", "merged_avg_min"] == 0.75
    assert seeds["selected_on"].tolist() == ["report+select", "report"]


@pytest.mark.slow
def test_the_selection_share_holds_other_test_texts(analyze, small_run) -> None:
    """The report share is the first max_test texts of each test split, the selection share the
    next ones: no text in both (checked on the texts)."""
    from osrm_core.demo import demo_task

    tasks = [demo_task(k, n_train=60, n_test=40) for k in SMALL_TASKS]
    arm = analyze.finished_arms([small_run])[0]
    report = analyze.ArmScorer(arm, tasks=tasks, max_test=15).tasks()
    select = analyze.ArmScorer(arm, tasks=tasks, max_test=15, share="select").tasks()
    for t in tasks:
        assert report[t.name].test.text == t.test.text[:15] and select[t.name].test.text == t.test.text[15:30]
        assert not set(report[t.name].test.text) & set(select[t.name].test.text)


def test_unknown_method_is_refused_with_the_registered_names(analyze, tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown merge method 'nope'; registered: task_arithmetic, ties"):
        analyze.score_all([], tmp_path, methods=["nope"])
    with pytest.raises(ValueError, match="unknown merge method 'ties:dense'"):
        analyze.score_all([], tmp_path, methods=["ties:dense"])
    assert analyze.method_space("ties:core") == ("ties", "core") and analyze.method_space("ties") == ("ties", "full")


@pytest.mark.slow
def test_merges_of_a_finished_run_match_its_sweep(analyze, small_run, tmp_path, monkeypatch) -> None:
    """On the small finished run the library's engine gives the sweep stage's scores for the
    merge of all its tasks, regmean (which needs the statistics) runs on a pair, and
    ``<method>:core`` merges in core space (the same merge for task arithmetic)."""
    from osrm_core.demo import demo_task
    from osrm_core.evaluate import SweepEngine

    spaces = []
    real_sweep = SweepEngine.sweep

    def sweep(self, methods, lambdas, **kwargs):
        spaces.append((tuple(methods), kwargs.get("space", "full")))
        return real_sweep(self, methods, lambdas, **kwargs)

    monkeypatch.setattr(SweepEngine, "sweep", sweep)

    tasks = [demo_task(k, n_train=60, n_test=40) for k in SMALL_TASKS]
    arms = analyze.finished_arms([small_run])
    assert [a.name for a in arms] == [f"{small_run.name}/standard", f"{small_run.name}/osrm"]
    subsets = {2: [tuple(SMALL_TASKS[:2])], 3: [tuple(SMALL_TASKS)]}
    single, merges = analyze.score_all(
        arms[:1], tmp_path, methods=["task_arithmetic", "regmean", "task_arithmetic:core"], lambdas=[0.5, 1.0],
        subsets=subsets, scorer=lambda arm: analyze.ArmScorer(arm, tasks=tasks), log=lambda m: None)
    sweep = RunDir(small_run).read_csv("sweep_standard.csv")
    ref = sweep[sweep["method"] == "task_arithmetic"].set_index(["lambda", "task"])
    ours = merges.query("n_tasks == 3 and method == 'task_arithmetic'").set_index(["lambda", "task"])
    pd.testing.assert_series_equal(ours["score"].sort_index(), ref["score"].sort_index(), check_names=False)
    assert dict(zip(single["task"], single["single"])) == ref.xs(1.0)["single"].to_dict()
    assert len(merges.query("method == 'regmean'")) == 2 * 2 + 2 * 3
    core = merges[merges["method"] == "task_arithmetic:core"].set_index(["subset", "lambda", "task"])["score"]
    full = merges[merges["method"] == "task_arithmetic"].set_index(["subset", "lambda", "task"])["score"]
    pd.testing.assert_series_equal(core.sort_index(), full.sort_index(), atol=0.01)  # the same merge, rounding apart
    assert set(spaces) == {(("task_arithmetic",), "full"), (("regmean",), "full"), (("task_arithmetic",), "core")}


def test_the_reports_tables_are_what_the_script_prints(analyze) -> None:
    """report.md's tables are generated from the committed merge rows (copy refreshed by hand)."""
    folder = SCRIPT.parent
    text = (folder / "report.md").read_text(encoding="utf-8")
    tables = text.split("<!-- report-tables -->\n", 1)[1].split("\n<!-- /report-tables -->", 1)[0]
    merges = analyze._read(folder / "partial" / "tables" / "merges.csv")
    assert tables == analyze.report_tables(merges)


@pytest.mark.slow
def test_the_advisor_searches_the_selection_share_and_is_scored_on_the_report_share(
        analyze, small_run, tmp_path, monkeypatch) -> None:
    """The advisor's texts are the selection share (checked on the texts: none of the report
    share's), its recommended merge is what is scored on the report share, and it is not searched
    again when the script resumes."""
    import osrm_core.advisor as advisor
    from osrm_core.demo import demo_task

    tasks = [demo_task(k, n_train=60, n_test=40) for k in SMALL_TASKS]
    calls = []
    real = advisor.advise

    def spy(model, tokenizer, adapters, given, **kwargs):
        calls.append((given, real(model, tokenizer, adapters, given, **kwargs)))
        return calls[-1][1]

    monkeypatch.setattr(advisor, "advise", spy)
    arm = analyze.finished_arms([small_run])[0]
    pair = tuple(SMALL_TASKS[:2])

    def run():
        return analyze.score_all([arm], tmp_path, methods=["advisor"], subsets={2: [pair]}, log=lambda m: None,
                                 scorer=lambda a: analyze.ArmScorer(a, tasks=tasks, max_test=15))[1]

    merges = run()
    (given, advice), = calls
    full = {t.name: t.test.text for t in tasks}
    for t in given:
        assert t.test.text == full[t.name][15:30] and not set(t.test.text) & set(full[t.name][:15])
    rows = merges[merges["method"] == "advisor"].set_index("task")
    assert sorted(rows.index) == sorted(pair) and rows["advised"].str.contains("weights").all()
    engine = analyze.ArmScorer(arm, tasks=tasks, max_test=15)._engine(pair)
    engine.apply(advice.merged)
    assert rows["score"].to_dict() == pytest.approx(engine.evaluate())
    engine.restore()
    run()
    assert len(calls) == 1
    assert analyze.best_per_subset(merges)["selected_on"].tolist() == ["select"]
