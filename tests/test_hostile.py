"""Hostile and broken inputs: adapters, zips, data files and numbers (a table, each row with
its exact message), random bytes, CSVs and zips thrown at the parsers (hypothesis), two app
sessions side by side in shared mode, and ``osrm run`` killed with SIGKILL at several points.

The table is the one in README.md, "Security model".
"""

from __future__ import annotations

import copy
import io
import json
import math
import re
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from _helpers import (
    B0,
    CRASH_TASKS,
    ENV,
    PICKLE_MESSAGE,
    Q0,
    ROOT,
    _nan_at,
    _pickled,
    _stats,
    _zip,
    assert_message,
    crash_files_fixture,  # noqa: F401  (the crash_files fixture)
    folder_files,
    full,
    osrm,
    variant,
    zip_bytes,
)
from safetensors.torch import load_file

from osrm_core.adapters import write_adapter
from osrm_core.demo import demo_task
from osrm_core.inits import init_lora, osrm_gen_subspace, osrm_subspace
from osrm_core.lock import LOCK_NAME
from osrm_core.spectra import symmetric_eigh
from osrm_core.stats import FeatureStats, LayerStats, collect_feature_stats
from osrm_core.train import adapter_of

# --------------------------------------------------------------------------- inputs


# --------------------------------------------------------------------------- numbers


def test_numbers_refused_with_the_allowed_range(tiny_stats):
    with pytest.raises(ValueError) as caught:
        osrm_subspace(tiny_stats[1:], rank=33)
    assert_message(str(caught.value), f"rank 33 is larger than the width 32 of layer '{Q0}'")
    with pytest.raises(ValueError) as caught:
        osrm_subspace(tiny_stats[1:], rank=0)
    assert_message(str(caught.value), "rank must be a positive integer, got 0")
    with pytest.raises(ValueError) as caught:
        symmetric_eigh(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))
    assert_message(str(caught.value), "matrix contains NaN or Inf")
    with pytest.raises(ValueError) as caught:
        symmetric_eigh(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    assert_message(str(caught.value), "matrix is not symmetric")


def test_few_tokens_warn(tokenizer, tiny_model):
    few = _stats(torch.randn(5, 32, generator=torch.Generator().manual_seed(0)))
    with pytest.warns(UserWarning) as caught:
        A = osrm_subspace([few], rank=8)["layer"]
    assert [str(w.message) for w in caught] == [
        "OSRM rank 8 at 'layer': the other tasks' statistics rest on 5 tokens, fewer than the width 32; "
        "at least 27 directions carry none of their energy, and the choice among them is a fixed rule, "
        "not the data (collect more samples)"
    ]
    torch.testing.assert_close(A @ A.T, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-12)
    assert float(torch.trace(A @ few.layers["layer"].second_moment @ A.T)) < 1e-12  # in the null space
    # A tiny task: the statistics rest on fewer tokens than the width.
    tiny = demo_task("sentiment", n_train=10, n_test=10)
    tiny.train = tiny.train.head(1)
    with pytest.warns(UserWarning) as caught:
        collect_feature_stats(tiny_model, tokenizer, tiny, max_samples=None)
    assert len(caught) == 1
    assert_message(str(caught[0].message), full(
        rf"task 'sentiment': statistics at '{re.escape(Q0)}' rest on \d+ tokens, fewer than the width 32; "
        r"the second moment is rank-deficient"))


def test_float16_overflow_is_named(make_tiny_model, tokenizer):
    model = make_tiny_model(dtype=torch.float16)
    with torch.no_grad():
        model.bert.embeddings.LayerNorm.weight.fill_(6e4)  # the next layer's input overflows to Inf
    with pytest.raises(ValueError) as caught:
        collect_feature_stats(model, tokenizer, demo_task("sentiment", n_train=10, n_test=10))
    assert_message(str(caught.value), f"layer '{Q0}': input features contain NaN or Inf")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_give_float64_statistics(make_tiny_model, tokenizer, tiny_stats, tiny_tasks, dtype):
    stats = collect_feature_stats(make_tiny_model(dtype=dtype), tokenizer, tiny_tasks[0], max_samples=None, batch_size=8)
    ref = tiny_stats[0]  # the same weights in float64
    for name, st_ in stats.layers.items():
        assert st_.sum_outer.dtype == torch.float64 and st_.count == ref.layers[name].count
        scale = float(ref.layers[name].second_moment.abs().max())
        tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
        assert float((st_.second_moment - ref.layers[name].second_moment).abs().max()) < tol * scale
    A = osrm_subspace([stats], rank=4)[Q0]
    assert A.dtype == torch.float64
    torch.testing.assert_close(A @ A.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12)


def test_singular_and_zero_statistics():
    gen = torch.Generator().manual_seed(0)
    rank_one = _stats(torch.randn(40, 1, generator=gen) @ torch.randn(1, 16, generator=gen))
    nearly = _stats(torch.randn(40, 16, generator=gen) * torch.logspace(0, -9, 16, dtype=torch.float64))
    zero = FeatureStats({"layer": LayerStats.zeros(16)}, task="z")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero tokens: the few-tokens warning, checked above
        for others in ([rank_one], [nearly], [zero], [rank_one, zero]):
            A = osrm_subspace(others, rank=4)["layer"]
            torch.testing.assert_close(A @ A.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-10)
            rest = sum(s.layers["layer"].second_moment for s in others) / len(others)
            lowest = torch.linalg.eigvalsh(rest)[:4].sum()
            assert math.isclose(float(torch.trace(A @ rest @ A.T)), float(lowest), abs_tol=1e-9 * float(rest.abs().max()) + 1e-300)
            G = osrm_gen_subspace(nearly, others, rank=4)["layer"]  # S_rest + ridge stays invertible
            torch.testing.assert_close(G @ G.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-10)
    # No tokens at all: the canonical basis of the whole space, the first unit vectors.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        A = osrm_subspace([zero], rank=3)["layer"]
    torch.testing.assert_close(A, torch.eye(16, dtype=torch.float64)[:3], rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore:OSRM rank")
def test_repeated_eigenvalues_give_one_choice():
    """The same matrix built from two bases of its repeated eigenspaces: eigh returns different
    eigenvectors for them, OSRM's subspace is the same (a fixed rule, not rounding noise)."""
    gen = torch.Generator().manual_seed(1)
    d = 12
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    lam = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 3, 4, 5], dtype=torch.float64)
    Q2 = Q.clone()
    for a, b in ((0, 5), (5, 8)):
        U, _ = torch.linalg.qr(torch.randn(b - a, b - a, generator=gen, dtype=torch.float64))
        Q2[:, a:b] = Q[:, a:b] @ U
    M1, M2 = Q @ torch.diag(lam) @ Q.T, Q2 @ torch.diag(lam) @ Q2.T
    assert float((M1 - M2).abs().max()) < 1e-14
    # (torch.linalg.eigh's first three eigenvectors of M1 and M2 differ by about 0.7 here.)
    for k in (3, 5, 7):  # cuts inside the 5-fold and the 3-fold eigenvalue
        A1 = osrm_subspace([FeatureStats({"l": LayerStats(M1, torch.zeros(d, dtype=torch.float64), 1, M1, 1)})], k)["l"]
        A2 = osrm_subspace([FeatureStats({"l": LayerStats(M2, torch.zeros(d, dtype=torch.float64), 1, M2, 1)})], k)["l"]
        torch.testing.assert_close(A1, A2, rtol=0, atol=1e-10)
    spectrum = symmetric_eigh(M1)
    V = spectrum.eigenvectors
    torch.testing.assert_close(M1 @ V, V * spectrum.eigenvalues, rtol=0, atol=1e-12)
    torch.testing.assert_close(V.T @ V, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-12)


def test_damaged_statistics_files_are_named(tmp_path):
    gen = torch.Generator().manual_seed(0)
    good = _stats(torch.randn(40, 8, generator=gen), layer=Q0)
    good.save(tmp_path / "ok.safetensors")
    assert FeatureStats.load(tmp_path / "ok.safetensors").count == 40
    bad = _stats(torch.randn(40, 8, generator=gen), layer=Q0)
    bad.layers[Q0].sum_outer[0, 0] = float("nan")
    bad.save(tmp_path / "nan.safetensors")
    with pytest.raises(ValueError) as caught:
        FeatureStats.load(tmp_path / "nan.safetensors")
    assert_message(str(caught.value), f"nan.safetensors: statistics at '{Q0}' hold NaN or Inf values")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "ok.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"^cut\.safetensors: damaged statistics file \(.+\)$"):
        FeatureStats.load(tmp_path / "cut.safetensors")


# --------------------------------------------------------------------------- two app sessions


def _minilm_adapter_zips(default_model, seed: int, tmp: Path) -> tuple[dict[str, bytes], dict]:
    """Two MiniLM adapters (named x and y) with random B from ``seed``, as zips, and their B at Q."""
    from app_helpers import zip_directory

    model, _ = default_model
    out, bs = {}, {}
    for k, name in enumerate(("x", "y")):
        peft_model = init_lora(copy.deepcopy(model), "standard", rank=2, alpha=4, seed=seed + k)
        gen = torch.Generator().manual_seed(seed * 10 + k)
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if ".lora_B." in pname:
                    p.copy_(torch.randn(p.shape, generator=gen))
        adapter = adapter_of(peft_model)
        folder = write_adapter(tmp / f"s{seed}" / name, adapter.layers, adapter.config, adapter.head)
        out[name] = zip_directory(folder)
        bs[name] = adapter.layers["bert.encoder.layer.0.attention.self.query"].B
    return out, bs


def _run_zip(name: str, model: str | None = None) -> bytes:
    from osrm_core.settings import RunConfig, TaskEntry

    config = RunConfig(name=name, model=model, tasks=[TaskEntry(name=k, spec=f"demo:{k}") for k in ("sentiment", "topic")])
    return zip_bytes({f"{name}/config.yaml": config.to_yaml().encode(), f"{name}/manifest.json": b'{"stages": {}}'})


def _clean(at) -> None:
    assert not at.exception, [e.value for e in at.exception]


def test_two_sessions_never_see_each_others_uploads(default_model, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("OSRM_SHARED", "1")
    monkeypatch.setenv("OSRM_RUNS_ROOT", str(tmp_path / "runs"))
    monkeypatch.setenv("OSRM_RUN_DIR", str(tmp_path / "runs" / "secret"))
    secret = tmp_path / "runs" / "secret"  # a run on the server: neither session may list or open it
    secret.mkdir(parents=True)
    with zipfile.ZipFile(io.BytesIO(_run_zip("secret"))) as zf:
        (secret / "config.yaml").write_bytes(zf.read("secret/config.yaml"))

    sessions = {k: AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run() for k in ("a", "b")}
    for at in sessions.values():
        _clean(at)
        assert "home_open_path" not in [w.key for w in at.text_input]  # no server paths typed in
        assert [r.options for r in at.radio if r.key == "home_model_kind"] == [["Packaged all-MiniLM-L6-v2 (offline)"]]
        assert "home_run_choice" not in [s.key for s in at.selectbox]
        assert at.session_state["run_path"] is None
        assert [w.value for w in at.warning] == [
            "OSRM_RUN_DIR is ignored in shared mode: each session opens only its own runs"
        ]
    # Each session uploads its own zipped run.
    sessions["a"].file_uploader(key="home_run_zip").upload("alpha.zip", _run_zip("alpha"), "application/zip")
    sessions["a"].run()
    sessions["b"].file_uploader(key="home_run_zip").upload("beta.zip", _run_zip("beta", model="/etc"), "application/zip")
    sessions["b"].run()
    paths = {k: Path(at.session_state["run_path"]) for k, at in sessions.items()}
    assert paths["a"].name == "alpha" and paths["b"].name == "beta"
    assert not paths["a"].is_relative_to(paths["b"].parents[2]) and not paths["b"].is_relative_to(paths["a"].parents[2])
    for k, at in sessions.items():
        at.run()
        _clean(at)
        assert Path(at.session_state["run_path"]) == paths[k]
        heads = [h.value for h in at.subheader]
        assert heads[0] == ("Run alpha" if k == "a" else "Run beta")
        assert not any("alpha" in h for h in heads) if k == "b" else not any("beta" in h for h in heads)
    # The run that names a server path opens (its results are files of the session) but does not run.
    assert [e.value for e in sessions["b"].error] == [
        "This run cannot be resumed here: in shared mode only the packaged model can be used; "
        "this run names model '/etc'"
    ]
    assert not sessions["a"].error and [b.key for b in sessions["a"].button if b.key == "home_resume"]

    # Adapters: the same file names, different contents.
    expected = {}
    for k, seed in (("a", 1), ("b", 2)):
        zips, expected[k] = _minilm_adapter_zips(default_model, seed, tmp_path)
        at = sessions[k]
        at.switch_page("pages/5_Adapter_diagnosis.py").run()
        _clean(at)
        assert "diag_model" not in [w.key for w in at.text_input]  # packaged model only
        for name, data in zips.items():
            at.file_uploader(key="diag_files").upload(f"{name}.zip", data, "application/zip")
        at.run()
        _clean(at)
        assert not at.error, [e.value for e in at.error]
    for k, at in sessions.items():
        at.run()
        read = at.session_state["diag_read"]["adapters"]
        assert sorted(read) == ["x", "y"]
        for name in ("x", "y"):
            B = read[name].layers["bert.encoder.layer.0.attention.self.query"].B
            torch.testing.assert_close(B, expected[k][name], rtol=0, atol=0)
            assert not torch.equal(B, expected["b" if k == "a" else "a"][name])
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["secret"]  # nothing written beside it


# --------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module", autouse=True)
def background(crash_files, tiny_model_dir, good_adapter):
    """The uninterrupted reference run and the command-line cases, started in the background
    when the module starts (each child spends seconds importing torch; the tests in between
    run meanwhile)."""
    root = crash_files["root"]
    pickled = _pickled(good_adapter, root / "pickled")
    nan = _zip(root / "nan", folder_files(variant(good_adapter, root / "nan_dir", edit=_nan_at(B0, float("nan")))))
    evil = _zip(root / "evil", {"../evil": b"1"})
    tasks = ["--task", f"sentiment={root / 'sentiment.csv'}", "--task", f"topic={root / 'topic.csv'}"]
    diagnose = ["diagnose", "--model", tiny_model_dir, *tasks, "--adapter", f"b={good_adapter}"]
    pool = ThreadPoolExecutor(max_workers=2)
    jobs = {
        "reference": pool.submit(osrm, "run", crash_files["config"], "--out", root / "reference"),
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


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_command_line_exits_2_with_the_message(case, background):
    result = background[case].result()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [CLI_CASES[case]]


# --------------------------------------------------------------------------- SIGKILL and resume


def _done(out: Path) -> set[str]:
    try:
        return set(json.loads((out / "manifest.json").read_text())["stages"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return set()


def _kill_after(config: Path, out: Path, log: Path, done: str, settle: float) -> set[str]:
    """Start ``osrm run``, wait until unit ``done`` is recorded, ``settle`` seconds more, SIGKILL.
    Returns the units done when it died."""
    with open(log, "ab") as err:
        proc = subprocess.Popen([sys.executable, "-m", "osrm_core.cli", "run", str(config), "--out", str(out)],
                                stdout=subprocess.DEVNULL, stderr=err, env=ENV)
        deadline = time.monotonic() + 240
        try:
            while done not in _done(out):
                assert proc.poll() is None, f"the run ended before {done!r}: {log.read_text()[-2000:]}"
                assert time.monotonic() < deadline, f"no {done!r} after 240 s"
                time.sleep(0.002)
            time.sleep(settle)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return _done(out)


def _assert_no_corrupt_file(out: Path) -> None:
    """Every file a reader looks at is whole: the manifest and the JSON/YAML/CSV files parse,
    statistics and adapters load, and each file a finished unit recorded has its hash."""
    import hashlib

    from osrm_core.adapters import read_adapter_dir

    manifest = json.loads((out / "manifest.json").read_text())
    yaml.safe_load((out / "config.yaml").read_text())
    for unit in manifest["stages"].values():
        for rel, sha in unit["files"].items():
            assert hashlib.sha256((out / rel).read_bytes()).hexdigest()[:16] == sha, rel
    for p in out.rglob("*"):
        if p.name.startswith("."):
            assert p.name.endswith(".tmp") or p.name == LOCK_NAME  # never read as results
        elif p.name == "adapter_config.json":
            read_adapter_dir(p.parent)
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".csv":
            pd.read_csv(p)
        elif p.suffix == ".safetensors":
            FeatureStats.load(p) if p.parent.name == "stats" else load_file(str(p))


def _assert_same_results(a: Path, b: Path) -> None:
    for rel in ["results/summary.json", *(f"results/{n}.csv" for n in
                ("sweep_standard", "sweep_osrm", "interference", "own_energy", "angles"))]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    for task in CRASH_TASKS:
        assert load_file(str(a / "stats" / f"{task}.safetensors")).keys() == load_file(str(b / "stats" / f"{task}.safetensors")).keys()
        for key, t in load_file(str(a / "stats" / f"{task}.safetensors")).items():
            assert torch.equal(t, load_file(str(b / "stats" / f"{task}.safetensors"))[key]), (task, key)
        for init in ("standard", "osrm"):
            wa = load_file(str(a / "adapters" / init / task / "adapter_model.safetensors"))
            wb = load_file(str(b / "adapters" / init / task / "adapter_model.safetensors"))
            assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), (init, task)
            ta, tb = (json.loads((r / "adapters" / init / task / "train.json").read_text()) for r in (a, b))
            ta.pop("seconds"), tb.pop("seconds")
            assert ta == tb


def test_sigkill_during_statistics_fine_tuning_and_sweep_then_resume(crash_files, background):
    config, root = crash_files["config"], crash_files["root"]
    out, log = root / "killed", root / "killed.log"
    # During the second task's statistics, during the second adapter's fine-tuning, during the
    # first sweep: each time the unit under way must not be done when the process dies.
    for done, settle, under_way in (
        ("stats/sentiment", 0.05, "stats/topic"),
        ("adapters/standard/sentiment", 0.3, "adapters/standard/topic"),
        ("adapters/osrm/topic", 0.05, "sweep/standard"),
    ):
        units = _kill_after(config, out, log, done, settle)
        assert done in units and under_way not in units, (done, sorted(units))
        _assert_no_corrupt_file(out)
    resumed = osrm("run", config, "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    assert not list(out.rglob(".*.tmp"))  # the killed runs' temporaries are gone
    _assert_no_corrupt_file(out)
    reference = background["reference"].result()
    assert reference.returncode == 0, reference.stderr
    assert json.loads((out / "manifest.json").read_text())["status"] == "done"
    _assert_same_results(out, root / "reference")
