"""Studies on a Ray cluster: the variants run as Ray tasks and write the files of a one-process run;
a failing task or variant is named; a missing ray package or an unreachable cluster is one line, exit 2."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_lock import _fingerprint
from test_pipeline import TASKS, _word_task
from test_study_grow import small_study

from osrm_core.errors import DataError, OsrmInputError
from osrm_core.parallel import RayCluster, ray_connection, run_parallel
from osrm_core.pipeline import Pipeline
from osrm_core.study import run_study, variant_name, variants


def _study_fingerprint(out: Path) -> dict[str, str]:
    """Each variant's run by its fingerprint, and the study's own files without wall times
    (timing.json, the report's sentence on them) and plotly's random ids of the figures."""
    prints = {rel: h for rel, h in _fingerprint(out).items() if not rel.startswith("runs/")}
    prints |= {f"runs/{run.name}/{rel}": h for run in (out / "runs").iterdir() for rel, h in _fingerprint(run).items()}
    del prints["timing.json"]
    report = (out / "report.md").read_text(encoding="utf-8")
    prints["report.md"] = re.sub(r" Wall time of the runs: [0-9.]+ min\.", "", report)
    curves = (out / "figures" / "curves.html").read_text(encoding="utf-8")
    prints["figures/curves.html"] = re.sub(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", "ID", curves)
    return prints


@pytest.mark.slow
def test_a_study_on_ray_writes_the_files_of_one_process(tiny_model_dir, tmp_path) -> None:
    """One cluster on this machine for the study and a failing task (ray.init takes seconds)."""
    pytest.importorskip("ray")
    study = small_study(tiny_model_dir, inits=["standard", "osrm"])
    assert len(variants(study)) == 2
    tasks = [_word_task(t, seed) for seed, t in enumerate(TASKS)]
    run_study(study, tmp_path / "one", tasks=tasks)
    cluster = RayCluster("local")
    with ray_connection(cluster):
        run_study(study, tmp_path / "ray", tasks=tasks, cluster=cluster)
        with pytest.raises(ValueError, match=r"^item two: invalid literal for int\(\) with base 10: 'x'$"):
            run_parallel(int, ["1", "x"], cluster=cluster, labels=["item one", "item two"])
    one = _study_fingerprint(tmp_path / "one")
    assert _study_fingerprint(tmp_path / "ray") == one
    for v in variants(study):
        assert f"runs/{variant_name(v)}/adapters/{v['init']}/{TASKS[0]}/adapter_model.safetensors" in one


def test_a_failing_variant_is_named(tiny_model_dir, tmp_path, monkeypatch) -> None:
    def fail(*args):
        raise DataError("task 'topic' has no texts")

    monkeypatch.setattr(Pipeline, "train_adapter", fail)
    study = small_study(tiny_model_dir)
    (v,) = variants(study)
    with pytest.raises(DataError, match=rf"^variant {variant_name(v)}: task 'topic' has no texts$"):
        run_study(study, tmp_path / "s", tasks=[_word_task(t, seed) for seed, t in enumerate(TASKS)])


def test_a_variant_whose_folder_the_driver_cannot_see_is_refused(tiny_model_dir, tmp_path, monkeypatch) -> None:
    """A task that finished on a node without the study's folder: its run is not there to report."""
    monkeypatch.setattr("osrm_core.study._run_variant", lambda item: variant_name(item[2]))
    study = small_study(tiny_model_dir)
    (v,) = variants(study)
    with pytest.raises(OsrmInputError, match=rf"^variant {variant_name(v)} finished, but .* holds no finished run "
                                         "here: on a Ray cluster the study's folder must be one every node shares"):
        run_study(study, tmp_path / "s", tasks=[_word_task(t, seed) for seed, t in enumerate(TASKS)])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address, message", [
    ("no-such-host.invalid:6379", "Ray cluster 'no-such-host.invalid:6379' cannot be reached ("),
    ("head-node", "Ray cluster address 'head-node' is not one of 'local' (a new cluster on this machine), "),
])
def test_an_unreachable_cluster_is_refused(address, message) -> None:
    pytest.importorskip("ray")
    with pytest.raises(OsrmInputError, match=f"^{re.escape(message)}"), ray_connection(RayCluster(address)):
        pass


def test_bad_ray_settings_are_refused() -> None:
    with pytest.raises(OsrmInputError, match=r"^threads of a Ray task must be an integer >= 1, got 0$"):
        RayCluster("local", threads=0)
    with pytest.raises(OsrmInputError, match=r"^jobs=2 splits this machine's cores between processes; on a Ray"):
        run_parallel(int, ["1"], 2, cluster=RayCluster("local"))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("ray_missing", [True, False])
def test_cli_without_ray_or_cluster_exits_2(tmp_path, ray_missing) -> None:
    """Without the ray package, or with a cluster address nothing answers at, before any work."""
    address = "local" if ray_missing else f"127.0.0.1:{_closed_port()}"
    message = ("error: a Ray cluster needs the ray package: pip install 'osrm-workbench[ray]'" if ray_missing else
               f"error: Ray cluster '{address}' cannot be reached ([Errno 111] Connection refused); give 'local' ")
    if not ray_missing:
        pytest.importorskip("ray")
    hide = "sys.modules['ray'] = None; " if ray_missing else ""  # as if ray were not installed
    script = f"import sys; {hide}from osrm_core.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", script, "study", "--quick", "--ray", address,
                           "--out", str(tmp_path / "s")], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(message) and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert not (tmp_path / "s").exists()
