"""The README's "How to add", done: a throwaway merge method, init, constraint and page, each
registered the documented way, show up where the README says they do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
import torch
from streamlit.testing.v1 import AppTest

from osrm_core import constraints, inits, merge
from osrm_core.cli import build_parser
from osrm_core.constraints import Constraint
from osrm_core.errors import ConfigError, OsrmInputError
from osrm_core.inits import InitMethod
from osrm_core.merge import MergeMethod, MergeParams
from osrm_core.params import Interval, ParamSpec, choice_param, number_param
from osrm_core.settings import MergeSettings, RunConfig, TaskEntry

TASKS = [TaskEntry(name="a", spec="demo:sentiment"), TaskEntry(name="b", spec="demo:topic")]
TASK_DICTS = [t.model_dump() for t in TASKS]


@dataclass
class ShrinkParams(MergeParams):
    shrink: float = number_param(0.5, "factor on the sum, in (0, 1]", Interval(0.0, 1.0, low_open=True))
    order: Literal["first", "last"] = choice_param("first", "which task leads")


class ShrunkSum(MergeMethod):
    """The sum of the deltas times ``shrink``: the smallest merge method there is."""

    name = "shrunk_sum"
    reference = "https://example.org/shrunk-sum"
    summary = "the sum of the deltas, shrunk"
    params_type = ShrinkParams

    def combine(self, deltas, gram, shape):
        return self.params.shrink * torch.stack(deltas).sum(dim=0)


def _subcommand(parser, name: str):
    return next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == name)[1]


def _flags(parser, command: str) -> dict:
    return {opt: action for action in _subcommand(parser, command)._actions for opt in action.option_strings}


@pytest.fixture
def shrunk_sum(monkeypatch):
    """The README's step: the class in the MERGE_METHODS registry."""
    monkeypatch.setitem(merge.MERGE_METHODS, ShrunkSum.name, ShrunkSum)
    return ShrunkSum


def test_a_merge_method_gets_its_cli_choice_flags_config_checks_and_merges(shrunk_sum) -> None:
    flags = _flags(build_parser(), "merge")
    assert "shrunk_sum" in flags["--method"].choices
    assert flags["--shrink"].type is float and flags["--order"].choices == ("first", "last")
    args = build_parser().parse_args(["merge", "--method", "shrunk_sum", "--shrink", "0.25", "--out", "x"])
    assert args.param_shrink == 0.25

    assert MergeSettings(methods=["shrunk_sum"], params={"shrink": [0.2, 1.0]}).methods == ["shrunk_sum"]
    with pytest.raises(ConfigError, match=r"shrink must be a number in \(0\.0, 1\.0\], got 2"):
        RunConfig.validate_dict({"tasks": TASK_DICTS, "merge": {"methods": ["shrunk_sum"], "params": {"shrink": [2]}}})
    with pytest.raises(OsrmInputError, match="order must be one of 'first', 'last'"):
        merge.get_merge_method("shrunk_sum", order="middle")

    deltas = [{"l": torch.ones(2, 3)}, {"l": 2 * torch.ones(2, 3)}]
    merged = merge.merge_deltas(deltas, "shrunk_sum", lam=2.0, shrink=0.5, weights=[1.0, 0.5])
    torch.testing.assert_close(merged["l"], 2.0 * 0.5 * (1 + 1) * torch.ones(2, 3))


def test_a_merge_method_gets_its_widgets(shrunk_sum) -> None:
    def page():
        from app_helpers.widgets import merge_param_widgets

        merge_param_widgets("shrunk_sum", "extend")

    at = AppTest.from_function(page).run()
    assert not at.exception
    (shrink,) = [w for w in at.number_input if w.key == "extend_shrink"]
    assert (shrink.value, shrink.min, shrink.max) == (0.5, 0.0, 1.0)
    assert [w.options for w in at.selectbox if w.key == "extend_order"] == [["first", "last"]]


def _scaled_identity(own_stats, other_stats, rank, *, gamma=0.5, device=None):
    return {name: gamma * torch.eye(rank, layer.d) for name, layer in own_stats.layers.items()}


def test_an_init_with_an_option_gets_its_flag_and_config_check(monkeypatch) -> None:
    init = InitMethod("eye", "the first coordinates, scaled", "#000000", subspace=_scaled_identity,
                      needs_own_stats=True, params=(ParamSpec("gamma", 0.5, "scale of A", range=(0.0, 1.0),
                                                              interval=Interval(0.0, 1.0, low_open=True)),))
    monkeypatch.setitem(inits.INITS, init.name, init)  # the README's step: its entry in INITS

    flags = _flags(build_parser(), "train")
    assert "eye" in flags["--init"].choices and flags["--eye-gamma"].type is float
    args = build_parser().parse_args(["train", "--task", "a=demo:sentiment", "--task", "b=demo:topic",
                                      "--init", "eye", "--eye-gamma", "0.25", "--out", "x"])
    from osrm_core.cli_commands import _config_from_args

    config = _config_from_args(args)
    assert config.inits == ["eye"] and config.init_params["eye"] == {"gamma": 0.25}
    assert RunConfig(tasks=TASKS).init_params["eye"] == {"gamma": 0.5}  # the default, filled in
    with pytest.raises(ConfigError, match=r"init_params: eye\.gamma must be a number in \(0\.0, 1\.0\], got 3"):
        RunConfig.validate_dict({"tasks": TASK_DICTS, "inits": ["eye"], "init_params": {"eye": {"gamma": 3}}})
    with pytest.raises(ConfigError, match="the options of eye are gamma"):
        RunConfig.validate_dict({"tasks": TASK_DICTS, "inits": ["eye"], "init_params": {"eye": {"beta": 1}}})


def test_a_constraint_gets_its_cli_choice_and_config_checks(monkeypatch) -> None:
    both = Constraint("project_penalty", "A projected onto the init's subspace, and the penalty on it",
                      needs_subspace=True, needs_moments=True)
    monkeypatch.setitem(constraints.CONSTRAINTS, both.name, both)  # the README's step: its entry in the registry

    assert "project_penalty" in _flags(build_parser(), "train")["--constraint"].choices
    config = RunConfig.validate_dict({"tasks": TASK_DICTS, "inits": ["osrm"], "train": {"constraint": "project_penalty"}})
    assert config.train.constraint == "project_penalty"
    with pytest.raises(ConfigError, match="train.constraint 'project_penalty' keeps A in the OSRM subspace, "
                                          "which init 'standard' has not"):
        RunConfig.validate_dict({"tasks": TASK_DICTS, "inits": ["standard"], "train": {"constraint": "project_penalty"}})
    with pytest.raises(ConfigError, match="unknown constraint 'project_pen'"):
        RunConfig.validate_dict({"tasks": TASK_DICTS, "train": {"constraint": "project_pen"}})
    with pytest.raises(OsrmInputError, match="constraint='project_penalty' needs subspaces"):
        both.prepare({"l": torch.nn.Linear(3, 2)})


PAGE = '''
import streamlit as st

from osrm_core.merge import method_table

st.title("Throwaway page")
st.dataframe(method_table())
'''


def test_a_page_file_renders(tmp_path) -> None:
    page = tmp_path / "9_Throwaway.py"
    page.write_text(PAGE)
    at = AppTest.from_file(str(page)).run()
    assert not at.exception
    assert [t.value for t in at.title] == ["Throwaway page"]
    assert len(at.dataframe) == 1


def test_the_readme_names_every_module_of_the_library() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    table = readme[readme.index("The library, one line per module:"):readme.index("### How to add")]
    named = {cell.strip("`") for line in table.splitlines() if line.startswith("| `")
             for cell in line.split("|")[1].replace(",", " ").split()}
    modules = {p.name if p.is_file() else f"{p.name}/" for p in (root / "osrm_core").iterdir()
               if (p.suffix == ".py" or (p / "__init__.py").is_file())}
    assert sorted(modules - named) == []
