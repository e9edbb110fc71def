"""Uploaded runs with one damaged file each: ``validate_run_dir`` names the file, the home page
shows it as an ``st.error``, the page that reads the file says what is wrong, and no page shows
an exception box."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from fixtures_run import small_run_fixture  # noqa: F401
from safetensors import safe_open
from safetensors.torch import save_file
from streamlit.testing.v1 import AppTest

from osrm_core.runcheck import RunFileError, read_result_table, read_summary, validate_run_dir

APP = str(Path(__file__).resolve().parents[1] / "app.py")
PAGES = {
    "eigen": "pages/1_Eigenspectra.py",
    "interference": "pages/2_Interference.py",
    "angles": "pages/3_Subspace_angles.py",
    "sweep": "pages/4_Lambda_sweep.py",
    "study": "pages/7_Study.py",
}


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    monkeypatch.delenv("OSRM_RUN_DIR", raising=False)
    monkeypatch.setenv("OSRM_RUNS_ROOT", str(tmp_path / "runs"))


def _cut(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _edit_text(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def _nan_stats(path: Path) -> None:
    with safe_open(str(path), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["0.sum"][3] = float("nan")
    save_file(tensors, str(path), metadata=metadata)


def _adapter_config_lies(path: Path) -> None:
    config = json.loads(path.read_text())
    config["r"] = 16  # the weights have rank 4
    path.write_text(json.dumps(config))


#: Damage: (file in the run, how to damage it, the page that reads it, what the message says).
DAMAGE: dict[str, tuple[str, Callable[[Path], None], str | None, str]] = {
    "truncated sweep table": ("results/sweep_standard.csv", _cut, "sweep",
                              "results/sweep_standard.csv: line "),
    "table with wrong columns": ("results/interference.csv",
                                 lambda p: _edit_text(p, "input_energy", "energy"), "interference",
                                 "results/interference.csv: column 'input_energy' is missing"),
    "table with text for numbers": ("results/angles.csv", lambda p: _edit_text(p, ",data-data,question,sentiment,2",
                                                                                ",data-data,question,sentiment,x"),
                                    "angles", "results/angles.csv: column 'min_angle' must hold numbers; line 2"),
    "summary not JSON": ("results/summary.json", _cut, None, "results/summary.json: not valid JSON"),
    "summary of the wrong shape": ("results/summary.json", lambda p: p.write_text('{"tasks": [], "inits": [], "results": []}'),
                                   None, "results/summary.json: 'results' must be an object"),
    "damaged adapter weights": ("adapters/osrm/topic/adapter_model.safetensors", _cut, None,
                                "adapters/osrm/topic: adapter_model.safetensors is damaged"),
    "adapter config lies about the rank": ("adapters/standard/sentiment/adapter_config.json", _adapter_config_lies,
                                           None, "adapters/standard/sentiment: layer "),
    "statistics with NaN": ("stats/topic.safetensors", _nan_stats, "eigen",
                            "stats/topic.safetensors: statistics at "),
    "statistics cut short": ("stats/sentiment.safetensors", _cut, "eigen",
                             "stats/sentiment.safetensors: damaged statistics file"),
    "a result changed after it was written": ("results/sweep_osrm.csv", lambda p: _edit_text(p, "task_arithmetic", "ties"),
                                              None, "results/sweep_osrm.csv: its hash differs from the one "
                                                    "manifest.json recorded"),
    "manifest not JSON": ("manifest.json", _cut, None, "manifest.json: not valid JSON"),
    "damaged study table": ("studies/quick/tables/q1_merged.csv", lambda p: p.write_bytes(b"a,b\n\xff\xfe,1\n"),
                            "study", "studies/quick/tables/q1_merged.csv: not a readable CSV table"),
}


def _damaged_copy(small_run: Path, root: Path, case: str) -> Path:
    run = root / "small"
    shutil.copytree(small_run, run)
    study = run / "studies" / "quick"  # a study with a report, for the study page
    (study / "tables").mkdir(parents=True)
    (study / "report.md").write_text("# Study\n\n## Findings\n\nnone\n")
    (study / "tables" / "q1_merged.csv").write_text("init,method,mean\nstandard,task_arithmetic,0.9\n")
    rel, damage, _, _ = DAMAGE[case]
    damage(run / rel)
    return run


def _zip(run: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(run.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(run.parent).as_posix())
    return buf.getvalue()


def test_a_whole_run_has_no_problems(small_run):
    assert validate_run_dir(small_run) == []


@pytest.mark.parametrize("case", list(DAMAGE))
def test_validate_run_dir_names_the_damaged_file(small_run, tmp_path, case):
    run = _damaged_copy(small_run, tmp_path, case)
    problems = validate_run_dir(run)
    expected = DAMAGE[case][3]
    assert any(p.startswith(expected) for p in problems), problems
    assert all("\n" not in p for p in problems)


def test_checked_readers_refuse_damage(tmp_path):
    table = tmp_path / "sweep_x.csv"
    table.write_text("init,method,density,lambda,task,score,single,normalized\nx,ta,,0.5,t,inf,0.5,1\n")
    with pytest.raises(RunFileError, match=r"^results/sweep_x.csv: column 'score' holds an infinite value$"):
        read_result_table(table, "sweep_x.csv")
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"tasks": ["t"], "inits": ["x"], "results": {"x": {
        "single": {"t": 0.5}, "merged": {"ta": [{"lambda": 0.5, "avg": "high", "scores": {"t": 0.5}}]}, "best": {}}}}))
    with pytest.raises(RunFileError, match=r"^results/summary.json: results\['x'\]\['merged'\]\['ta'\]\[0\]: 'avg' must be a number$"):
        read_summary(summary)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(DAMAGE))
def test_uploaded_damaged_run_gives_errors_and_pages_keep_working(small_run, tmp_path, case):
    rel, _, page, expected = DAMAGE[case]
    data = _zip(_damaged_copy(small_run, tmp_path / "src", case))
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.file_uploader(key="home_run_zip").upload("damaged.zip", data, "application/zip")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    errors = [str(e.value) for e in at.error]
    assert any(e.startswith(f"Damaged file in this run: {expected}") for e in errors), errors
    for name, path in PAGES.items():
        at.switch_page(path).run()
        assert not at.exception, (name, [e.value for e in at.exception])
        errors = [str(e.value) for e in at.error]
        if name == page:
            assert len(errors) == 1 and errors[0].startswith("This page cannot be shown: "), errors
            assert Path(rel).name in errors[0], errors
        else:
            assert not errors, (name, errors)
    yaml.safe_load((Path(at.session_state["run_path"]) / "config.yaml").read_text())  # it was opened
