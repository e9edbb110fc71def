"""The app in shared mode (``OSRM_SHARED``): two sessions side by side never see each other's
uploaded runs or adapters, nor a run on the server."""

from __future__ import annotations

import copy
import io
import zipfile
from pathlib import Path

import torch
from _helpers import ROOT, zip_bytes

from osrm_core.adapters import write_adapter
from osrm_core.inits import init_lora
from osrm_core.train import adapter_of


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
