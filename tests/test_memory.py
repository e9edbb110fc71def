"""The memory plan of the workflows on given adapters (:mod:`osrm_core.memory`): the bytes of dense
statistics and of RegMean's Gram matrices, which statistics ``stats_plan`` chooses by what is
available, and the one-line refusals before any work."""

from __future__ import annotations

import pytest
import torch

import osrm_core.memory
from osrm_core.adapters import Adapter, LoraWeights
from osrm_core.memory import (
    GiB,
    MemoryPlanError,
    check_grams,
    dense_stats_bytes,
    gram_bytes,
    regmean_solve_bytes,
    stats_plan,
)


def _adapters(kinds: dict[str, tuple[int, int]], blocks: int = 2, n: int = 2) -> dict[str, Adapter]:
    """``n`` rank-1 adapters on every block's layers of ``kinds`` (name to ``(d_out, d_in)``)."""
    layers = {f"model.layers.{b}.{name}": LoraWeights(torch.zeros(1, d_in), torch.zeros(d_out, 1), 1.0)
              for b in range(blocks) for name, (d_out, d_in) in kinds.items()}
    return {f"t{k}": Adapter(layers, {}, {}) for k in range(n)}


LLAMA_1B = {"self_attn.q_proj": (2048, 2048), "self_attn.k_proj": (512, 2048), "self_attn.v_proj": (512, 2048),
            "self_attn.o_proj": (2048, 2048), "mlp.gate_proj": (8192, 2048), "mlp.up_proj": (8192, 2048),
            "mlp.down_proj": (2048, 8192)}


@pytest.fixture
def available(monkeypatch):
    """Set the memory the plan sees as available, in bytes."""
    def set_to(value: int) -> None:
        monkeypatch.setattr(osrm_core.memory, "available_bytes", lambda device="cpu": value)

    return set_to


def test_gram_bytes_are_one_moment_per_input_and_the_largest_solve() -> None:
    adapters = _adapters(LLAMA_1B)
    widths = {name: d_in for name, (_, d_in) in
              {f"model.layers.{b}.{k}": s for b in range(2) for k, s in LLAMA_1B.items()}.items()}
    # q/k/v read one input, gate/up one, o and down their own: 4 inputs per block
    per_block = 3 * (2048 * 2048 + 2048) + (8192 * 8192 + 8192)
    assert dense_stats_bytes(widths, 2, "float32", sample_means=False) == 2 * 2 * per_block * 4
    assert dense_stats_bytes(widths, 2) == 2 * 2 * (per_block + 3 * 2048**2 + 8192**2) * 8
    assert regmean_solve_bytes({"a": (2048, 8192), "b": (8192, 2048)}) == (3 * 8192**2 + 3 * 2048 * 8192) * 8
    assert gram_bytes(adapters, 2, "float32") == 2 * 2 * per_block * 4 + (3 * 8192**2 + 3 * 2048 * 8192) * 8
    with pytest.raises(ValueError, match="stats_dtype must be 'float64' or 'float32', got 'bfloat16'"):
        gram_bytes(adapters, 2, "bfloat16")


def test_stats_plan_takes_dense_when_it_fits_and_projected_otherwise(available) -> None:
    adapters = _adapters(LLAMA_1B)
    available(10**15)
    assert stats_plan("auto", adapters, 2, regmean=True) == osrm_core.memory.StatsPlan(False, True, ())
    assert stats_plan("projected", adapters, 2) == osrm_core.memory.StatsPlan(True, False, ())
    assert stats_plan("projected", adapters, 2, regmean=True).grams
    available(4 * GiB)
    plan = stats_plan("auto", adapters, 2, regmean=True)  # dense 4.75 GiB + eigh 2.5 GiB + the solve 1.9 GiB
    assert plan.projected and not plan.grams and plan.kind == "projected"
    assert plan.notes[0] == ("dense statistics of 2 tasks needs 9.1 GiB, 4.0 GiB available: use --stats projected "
                             "(every table but post-hoc OSRM and the principal angles); collecting projected "
                             "statistics")
    assert plan.notes[1] == ("regmean left out: RegMean's Gram matrices of 2 tasks needs 4.3 GiB, 4.0 GiB available: "
                             "use --stats-dtype float32 (half the memory) or a method without Gram matrices")
    assert stats_plan("projected", adapters, 2, stats_dtype="float32", regmean=True).grams  # 3.1 GiB
    with pytest.raises(MemoryPlanError, match=r"^dense statistics of 2 tasks needs 7\.3 GiB, 4\.0 GiB available"):
        stats_plan("dense", adapters, 2)
    assert stats_plan("auto", adapters, 2, sample_means=False).projected  # 2.4 GiB + eigh 2.5 GiB
    available(5 * GiB)
    assert not stats_plan("auto", adapters, 2, sample_means=False).projected
    with pytest.raises(ValueError, match="statistics must be 'auto', 'projected' or 'dense', got 'full'"):
        stats_plan("full", adapters, 2)
    available(2 * GiB)
    with pytest.raises(MemoryPlanError, match=r"^RegMean's Gram matrices of 2 tasks needs 3\.1 GiB, 2\.0 GiB "
                                              "available: use a merge method without Gram matrices$"):
        check_grams(adapters, 2, "float32")


REFUSED = {
    "diagnose --stats dense": (["diagnose", "--stats", "dense"], "dense statistics of 2 tasks needs 0.0 GiB"),
    "advise --stats dense": (["advise", "--stats", "dense", "--methods", "ties", "--out", "OUT"],
                             "dense statistics of 2 tasks needs 0.0 GiB"),
    "merge --method regmean": (["merge", "--method", "regmean", "--out", "OUT"],
                               "RegMean's Gram matrices of 2 tasks needs 0.0 GiB"),
    "sweep with regmean": (["sweep", "--methods", "task_arithmetic", "regmean", "--stats-dtype", "float32"],
                           "RegMean's Gram matrices of 2 tasks needs 0.0 GiB"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_plan_that_does_not_fit_is_refused_before_loading_anything(case, good_adapter, available, monkeypatch,
                                                                     tmp_path, capsys) -> None:
    import osrm_core.workflows
    from osrm_core.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the plan refused")

    monkeypatch.setattr(osrm_core.workflows, "load_base_for", no_model)
    available(1000)
    command, message = REFUSED[case]
    code = main([*[str(tmp_path / "out") if a == "OUT" else a for a in command], "--adapter", f"a={good_adapter}",
                 "--adapter", f"b={good_adapter}", "--task", "a=demo:sentiment", "--task", "b=demo:topic"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {message}, 0.0 GiB available: use "), err
