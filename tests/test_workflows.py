"""The workflows that the command line and the app share (:mod:`osrm_core.workflows`): a merged
adapter written by the app's code path and by ``osrm merge`` loads with plain peft and carries
base + merged Delta W; ``osrm diagnose`` and the diagnosis page's function give the same tables."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile

import pandas as pd
import pytest
import torch
from _helpers import ENV
from conftest import TINY_TARGETS

from osrm_core.adapters import load_adapter
from osrm_core.demo import demo_task
from osrm_core.stats import collect_feature_stats
from osrm_core.workflows import diagnose_adapters

TASKS = ("sentiment", "topic")


@pytest.fixture(scope="module")
def peft_adapters(tiny_model_dir, tmp_path_factory):
    """Two LoRA adapters made by plain peft (random A and B: a real delta each) on the saved tiny
    model, with their naive float64 ``s B A`` per layer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("peft-adapters")
    folders, deltas = {}, {}
    for seed, task in enumerate(TASKS):
        torch.manual_seed(seed)
        base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
        config = LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"],
                            init_lora_weights=False)
        model = get_peft_model(base, config)
        folders[task] = root / task
        model.save_pretrained(folders[task])
        deltas[task] = {}
        for name in TINY_TARGETS:
            layer = model.get_base_model().get_submodule(name)
            A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
            deltas[task][name] = layer.scaling["default"] * B @ A
    return folders, deltas


def _loaded_weights(model_dir, adapter_dir) -> dict[str, torch.Tensor]:
    """The target layers' weights of the base model with the adapter merged in, by plain peft."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(model_dir)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return {n: merged.get_submodule(n).weight.detach().double() for n in TINY_TARGETS}


def _base_weights(model_dir) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(model_dir)
    return {n: base.get_submodule(n).weight.detach().double() for n in TINY_TARGETS}


def _check_merged(model_dir, adapter_dir, expected_delta) -> None:
    loaded, w0 = _loaded_weights(model_dir, adapter_dir), _base_weights(model_dir)
    for name in TINY_TARGETS:
        torch.testing.assert_close(loaded[name], w0[name] + expected_delta[name], atol=1e-5, rtol=1e-5)
    for task in TASKS:
        assert (adapter_dir / "heads" / f"{task}.safetensors").is_file()


def test_the_apps_merged_adapter_loads_with_plain_peft(peft_adapters, tiny_model_dir, tmp_path) -> None:
    from app_helpers import merged_adapter_zip

    folders, deltas = peft_adapters
    adapters = {t: load_adapter(folders[t]) for t in TASKS}
    data = merged_adapter_zip(adapters, "merged", "task_arithmetic", lam=0.7)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        zf.extractall(tmp_path)
    expected = {n: 0.7 * sum(deltas[t][n] for t in TASKS) for n in TINY_TARGETS}
    _check_merged(tiny_model_dir, tmp_path / "merged", expected)


@pytest.mark.slow
def test_osrm_merge_loads_with_plain_peft(peft_adapters, tiny_model_dir, tmp_path) -> None:
    folders, deltas = peft_adapters
    out = tmp_path / "merged"
    result = subprocess.run(
        [sys.executable, "-m", "osrm_core.cli", "merge", *[a for t in TASKS for a in ("--adapter", f"{t}={folders[t]}")],
         "--method", "task_arithmetic", "--lambda", "0.5", "--out", str(out)],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    _check_merged(tiny_model_dir, out, {n: 0.5 * sum(deltas[t][n] for t in TASKS) for n in TINY_TARGETS})


@pytest.mark.slow
def test_osrm_merge_refuses_a_parameter_of_another_method(peft_adapters, tmp_path) -> None:
    folders, _ = peft_adapters
    result = subprocess.run(
        [sys.executable, "-m", "osrm_core.cli", "merge", *[a for t in TASKS for a in ("--adapter", f"{t}={folders[t]}")],
         "--method", "task_arithmetic", "--density", "0.3", "--out", str(tmp_path / "m")],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --density is not a parameter of merge method 'task_arithmetic'; its parameters: none"
    ]


@pytest.mark.slow
def test_osrm_diagnose_and_the_page_give_the_same_tables(peft_adapters, tiny_model_dir, tokenizer, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    from app_helpers import text_task

    folders, _ = peft_adapters
    texts = {t: demo_task(t, n_train=12, n_test=10).train.text for t in TASKS}
    args = []
    for t in TASKS:  # the same texts as a task folder for the command line
        (tmp_path / t).mkdir()
        for split in ("train", "test"):
            pd.DataFrame({"text": texts[t], "label": [0, 1] * 6}).to_csv(tmp_path / t / f"{split}.csv", index=False)
        args += ["--adapter", f"{t}={folders[t]}", "--task", f"{t}={tmp_path / t}"]
    out = tmp_path / "diagnosis"
    result = subprocess.run(
        [sys.executable, "-m", "osrm_core.cli", "diagnose", "--model", str(tiny_model_dir), *args,
         "--samples", "100", "--max-length", "24", "--out", str(out)],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert result.returncode == 0, result.stderr

    # What the page does: statistics of the pasted texts, then diagnose_adapters.
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    adapters = {t: load_adapter(folders[t], model) for t in TASKS}
    stats = {
        t: collect_feature_stats(model, tokenizer, text_task(t, texts[t]), target_modules=sorted(adapters[t].layers),
                                 max_samples=None, max_length=24)
        for t in TASKS
    }
    page = diagnose_adapters(model, adapters, stats)
    for name in ("interference", "angles", "own_energy", "posthoc"):
        cli = pd.read_csv(out / f"{name}.csv")
        mine = getattr(page, name).reset_index(drop=True)
        assert list(cli.columns) == list(mine.columns), name
        pd.testing.assert_frame_equal(cli, mine, check_dtype=False, rtol=1e-6, atol=1e-9, obj=name)
    pd.testing.assert_frame_equal(pd.read_csv(out / "matrix.csv"), page.matrix.reset_index(),
                                  check_dtype=False, rtol=1e-6, check_names=False)


def test_angles_from_sketches_are_the_dense_ones_within_their_bound(default_model) -> None:
    """With projected statistics and sketches (``osrm diagnose --stats projected --angles sketch``),
    every principal angle is within its row's stated bound of the dense path's, on the packaged model."""
    from osrm_core.adapters import Adapter, LoraWeights
    from osrm_core.demo import demo_tasks
    from osrm_core.workflows import sketch_angles, task_sketches, task_stats

    model, tokenizer = default_model
    tasks = demo_tasks(seed=0, n_train=40, n_test=10)[:2]
    layers = [f"bert.encoder.layer.3.attention.self.{kind}" for kind in ("query", "value")]
    layers.append("bert.encoder.layer.5.output.dense")
    gen = torch.Generator().manual_seed(0)
    shapes = {n: model.get_submodule(n).weight.shape for n in layers}
    adapters = {t.name: Adapter({n: LoraWeights(torch.randn(4 + k, d_in, generator=gen), torch.randn(d_out, 4 + k,
                                                generator=gen), 2.0) for n, (d_out, d_in) in shapes.items()}, {}, {})
                for k, t in enumerate(tasks)}  # ranks 4 and 5: the angles compare k = 4
    options = {"samples": None, "max_length": 32}
    with pytest.warns(UserWarning, match="rank-deficient"):
        dense_stats = task_stats(model, tokenizer, tasks, target_modules=layers, **options)
    dense = diagnose_adapters(model, adapters, dense_stats)
    projected = task_stats(model, tokenizer, tasks, adapters=adapters, **options)
    sketches = task_sketches(model, tokenizer, tasks, adapters, power=8, **options)
    angles = diagnose_adapters(model, adapters, projected, sketches=sketches).angles
    keys = ["layer", "kind", "a", "b"]
    exact = dense.angles[dense.angles["init"] == "uploaded"].drop(columns="init")
    both = angles.merge(exact, on=keys, suffixes=("", "_dense"), validate="one_to_one")
    assert len(both) == len(exact) == len(angles) == 3 * (1 + 2 * 2)  # per layer a data pair, 2 x 2 adapter-data
    assert (both["bound"] < 1).all() and (both["init"] == "uploaded").all()
    for col in ("min_angle", "mean_angle"):
        assert ((both[col] - both[f"{col}_dense"]).abs() <= both["bound"] + 1e-9).all(), col
    with pytest.raises(ValueError, match="^sketches serve projected statistics; dense statistics give the exact"):
        diagnose_adapters(model, adapters, dense_stats, sketches=sketches)
    rank3 = {n: Adapter({k: LoraWeights(lw.A[:3], lw.B[:, :3], lw.scale) for k, lw in a.layers.items()}, {}, {})
             for n, a in adapters.items()}
    with pytest.raises(ValueError, match="^the sketch of task 'sentiment' has k=4; the angles need k=3, the smallest"):
        sketch_angles(rank3, projected, sketches)


def test_the_public_names_are_their_modules_own() -> None:
    """``osrm_core`` imports each public name from its module on first use: the very object,
    listed by ``dir``; an unknown name is an AttributeError naming it."""
    import importlib

    import osrm_core

    for name in osrm_core.__all__:
        home = importlib.import_module(f"osrm_core.{osrm_core._HOME[name]}")
        assert getattr(osrm_core, name) is getattr(home, name), name
    assert set(osrm_core.__all__) <= set(dir(osrm_core))
    import osrm_core.advisor.search  # noqa: F401  (the advisor package does not shadow the workflow)

    assert callable(osrm_core.advise)
    with pytest.raises(AttributeError, match="module 'osrm_core' has no attribute 'nope'"):
        osrm_core.nope  # noqa: B018
