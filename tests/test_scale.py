"""The scale test bed (:mod:`bench.scale_model`) at test size: a LLaMA of Llama-3.2-1B's layout
(GQA, seven linear kinds, tied embeddings) with random weights in sharded safetensors, plain-peft
adapters of different ranks and targets, and ``osrm diagnose``, ``osrm merge`` (every method,
both spaces) and ``osrm advise`` (projected statistics) on it; merged adapters load back with
plain peft."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.scale_model import KINDS, build_testbed
from osrm_core.cli import main
from osrm_core.merge import MERGE_METHODS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bed(tmp_path_factory) -> dict:
    return build_testbed(tmp_path_factory.mktemp("bed"), adapters=3, texts=10, tokens=24)


def _adapter_args(bed: dict) -> list[str]:
    return [arg for n, p in bed["adapters"].items() for arg in ("--adapter", f"{n}={p}")]


def _task_args(bed: dict) -> list[str]:
    return [arg for k, n in enumerate(bed["adapters"]) for arg in ("--task", f"{n}={bed['tasks']['ab'[k % 2]]}")]


def _osrm(*args) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "osrm_core.cli", *map(str, args)], capture_output=True,
                            text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def _load_with_peft(model_dir: str, adapter_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def test_testbed_is_sharded_with_peft_adapters_on_seven_kinds(bed) -> None:
    model = Path(bed["model"])
    index = json.loads((model / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    config = json.loads((model / "config.json").read_text())
    assert config["num_key_value_heads"] < config["num_attention_heads"] and config["tie_word_embeddings"]
    configs = [json.loads((Path(p) / "adapter_config.json").read_text()) for p in bed["adapters"].values()]
    assert set(configs[0]["target_modules"]) == set(KINDS) and configs[0]["r"] == 16
    assert configs[1]["rank_pattern"] == {"down_proj": 8}
    assert set(configs[2]["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    peft_model = _load_with_peft(bed["model"], Path(bed["adapters"]["t1"]))
    down = peft_model.base_model.model.model.layers[0].mlp.down_proj
    assert down.lora_A["default"].weight.shape[0] == 8


@pytest.mark.parametrize("space", ["full", "core"])
@pytest.mark.parametrize("method", list(MERGE_METHODS))
def test_every_merge_loads_back_with_plain_peft(bed, method, space, tmp_path, capsys) -> None:
    args = ["merge", *_adapter_args(bed), "--method", method, "--space", space, "--out", tmp_path / "m"]
    if MERGE_METHODS[method].needs_gram:
        args += ["--model", bed["model"], *_task_args(bed), "--samples", "4"]
    code = main(list(map(str, args)))
    if space == "core" and MERGE_METHODS[method].needs_gram:
        assert code == 2 and "core does not support" in capsys.readouterr().err
        return
    assert code == 0, capsys.readouterr().err
    peft_model = _load_with_peft(bed["model"], tmp_path / "m")
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    with torch.no_grad():
        merged = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
    assert torch.isfinite(merged).all() and not torch.allclose(merged, base)


@pytest.mark.slow
def test_cli_diagnose_projected_in_bfloat16_and_dense(bed) -> None:
    common = ["diagnose", "--model", bed["model"], *_adapter_args(bed), *_task_args(bed), "--samples", "6", "--json"]
    projected = json.loads(_osrm(*common, "--stats", "projected", "--dtype", "bfloat16").stdout)
    dense = json.loads(_osrm(*common, "--stats", "dense").stdout)
    assert not projected["posthoc"] and not projected["angles"] and dense["posthoc"] and dense["angles"]
    assert len(projected["interference"]) == sum(r["init"] == "uploaded" for r in dense["interference"])
    assert {r["adapter"] for r in projected["coverage"]} == set(bed["adapters"])
    sketched = json.loads(_osrm(*common, "--stats", "projected", "--angles", "sketch", "--sketch-power", "1").stdout)
    key = ("layer", "kind", "a", "b")
    assert ({tuple(r[k] for k in key) for r in sketched["angles"]}
            == {tuple(r[k] for k in key) for r in dense["angles"] if r["init"] == "uploaded"})
    assert all(0 <= r["bound"] <= 90 for r in sketched["angles"])
    assert {(r["task"], r["power"]) for r in sketched["sketch"]} == {(t, 1) for t in bed["adapters"]}


@pytest.mark.slow
def test_cli_merge_and_advise_on_the_testbed(bed, tmp_path) -> None:
    _osrm("merge", *_adapter_args(bed), "--method", "ties", "--space", "core", "--out", tmp_path / "ties")
    assert (tmp_path / "ties" / "adapter_model.safetensors").is_file()
    out = json.loads(_osrm("advise", "--model", bed["model"], *_adapter_args(bed), *_task_args(bed),
                           "--samples", "8", "--methods", "task_arithmetic", "ties", "regmean", "--lambdas", "0.5",
                           "1.0", "--budget", "2", "--stats", "projected", "--stats-dtype", "float32",
                           "--out", tmp_path / "advice", "--json").stdout)
    assert out["settings"]["stats"] == "projected" and "regmean" in out["settings"]["methods"]  # its Grams fit
    assert out["notes"] == ["per-layer verdicts from projected statistics: post-hoc OSRM left out (it needs the "
                            "d x d moments; --stats dense)"]
    assert len(out["layers"]) == 14 and all(r["removed_by_posthoc"] is None for r in out["layers"])
    adapter = next(Path(out["out"]).rglob("adapter_config.json")).parent
    peft_model = _load_with_peft(bed["model"], adapter)
    with torch.no_grad():
        assert torch.isfinite(peft_model(input_ids=torch.tensor([[5, 9, 17]])).logits).all()


def test_readme_memory_table_is_what_the_plan_prints() -> None:
    from osrm_core.memory import scale_table

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("<!-- scale-table -->\n", 1)[1].split("\n<!-- /scale-table -->", 1)[0]
    assert table == scale_table()
