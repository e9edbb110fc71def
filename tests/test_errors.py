"""Bad input is an ``OsrmInputError`` and exits 2; anything else is a bug and exits 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from osrm_core import errors
from osrm_core.cli import main
from osrm_core.errors import ConfigError, DataError, InputTypeError, OsrmInputError
from osrm_core.merge import get_merge_method, merge_deltas
from osrm_core.settings import RunConfig

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
# A bug planted in the library: RunDir.exists raises a plain ValueError, as a wrong internal call would.
BUG = ("import sys, osrm_core.rundir as r\n"
       "def broken(self):\n    raise ValueError('planted bug')\n"
       "r.RunDir.exists = broken\n"
       "from osrm_core.cli import main\nsys.exit(main(sys.argv[1:]))\n")


def _planted_bug(self):
    raise ValueError("planted bug")


def test_every_input_error_is_an_osrm_input_error_and_a_value_error() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert len(classes) >= 8
    assert all(issubclass(c, OsrmInputError) and issubclass(c, ValueError) for c in classes)
    assert issubclass(InputTypeError, TypeError)


def test_the_library_raises_input_errors_for_bad_input(tmp_path) -> None:
    with pytest.raises(OsrmInputError, match="unknown merge method 'nope'"):
        get_merge_method("nope")
    with pytest.raises(InputTypeError, match="deltas of task 0 must be a dict"):
        merge_deltas([torch.zeros(2, 2)], method="task_arithmetic")
    with pytest.raises(ConfigError):
        RunConfig.from_yaml(tmp_path / "missing.yaml")
    from osrm_core.data import load_task

    with pytest.raises(DataError):
        load_task("t", tmp_path / "missing.csv")


def test_bad_input_exits_2_and_a_bug_exits_1(tmp_path, capsys, monkeypatch) -> None:
    assert main(["show", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "is not a run directory" in err[0]

    monkeypatch.setattr("osrm_core.rundir.RunDir.exists", _planted_bug)
    assert main(["show", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == "internal error: ValueError: planted bug"


def test_argparse_usage_error_exits_2(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "--no-such-flag"])
    assert exit_.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.slow
def test_command_line_bad_input_exits_2_and_bug_exits_1(tmp_path) -> None:
    bad = subprocess.run([sys.executable, "-m", "osrm_core.cli", "show", str(tmp_path / "nowhere")],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ")

    bug = subprocess.run([sys.executable, "-c", BUG, "show", str(tmp_path)],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert bug.returncode == 1 and "Traceback" not in bug.stderr
    assert bug.stderr.strip().splitlines()[-1] == "internal error: ValueError: planted bug"
