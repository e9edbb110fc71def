"""Tests of osrm_core.train: the fine-tuning loop, its constraints, and adapters that plain peft
loads back (also after a PiSSA init that changed the base weights)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_TARGETS
from torch.testing import assert_close

from osrm_core.adapters import lora_from_model
from osrm_core.batching import iter_batches
from osrm_core.data import Split, TaskData
from osrm_core.inits import init_lora
from osrm_core.settings import TrainSettings
from osrm_core.train import adapter_of, finetune, save_adapter, training_batches

RANK = 2
#: Settings under which the tiny random BERT learns the easy task in a fraction of a second.
FAST = dict(steps=40, batch_size=8, lr=5e-2, warmup_ratio=0.0)
MAX_LENGTH = 16

_WORDS = {0: ["awful", "terrible", "bad", "horrible"], 1: ["great", "excellent", "good", "wonderful"]}


def _split(rng: np.random.Generator, n: int) -> Split:
    labels = np.arange(n) % 2
    return Split([" ".join(rng.choice(_WORDS[int(y)], 3)) for y in labels], labels)


@pytest.fixture(scope="module")
def easy_task() -> TaskData:
    """Three words of one polarity: separable by which tokens occur."""
    rng = np.random.default_rng(0)
    return TaskData("easy", _split(rng, 32), _split(rng, 16), ["negative", "positive"])


def _full_loss(model, tokenizer, split: Split) -> float:
    batch = next(iter_batches(tokenizer, split, batch_size=len(split), max_length=16))
    with torch.no_grad():
        return float(model(**batch).loss)


def _logits(model, tokenizer, split: Split) -> torch.Tensor:
    batch = next(iter_batches(tokenizer, split, batch_size=len(split), max_length=16, with_labels=False))
    with torch.no_grad():
        return model(**batch).logits


def _a(peft_model) -> dict[str, torch.Tensor]:
    return {n: lw.A for n, lw in lora_from_model(peft_model).layers.items()}


def test_finetune_lowers_the_loss(make_tiny_model, tokenizer, easy_task) -> None:
    model = init_lora(make_tiny_model(), "standard", rank=RANK, alpha=4)
    before = _full_loss(model, tokenizer, easy_task.train)
    steps = []
    result = finetune(model, tokenizer, easy_task, TrainSettings(**FAST), max_length=MAX_LENGTH,
                      progress=lambda s, t, m: steps.append((s, t)))
    after = _full_loss(model, tokenizer, easy_task.train)
    assert after < 0.5 * before
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5])
    assert len(result.losses) == FAST["steps"] and steps[-1] == (FAST["steps"], FAST["steps"])
    assert result.test_score > 0.9 and result.metric == "accuracy" and result.tokens > 0
    assert not model.training


def test_same_seed_same_adapter_and_score(make_tiny_model, tokenizer, easy_task) -> None:
    config = TrainSettings(**{**FAST, "steps": 10})
    runs = []
    for _ in range(2):
        model = init_lora(make_tiny_model(), "standard", rank=RANK, alpha=4, seed=1)
        result = finetune(model, tokenizer, easy_task, config, max_length=MAX_LENGTH, seed=3)
        runs.append((adapter_of(model), result))
    (a1, r1), (a2, r2) = runs
    for name in a1.layers:
        assert torch.equal(a1.layers[name].A, a2.layers[name].A)
        assert torch.equal(a1.layers[name].B, a2.layers[name].B)
    for key in a1.head:
        assert torch.equal(a1.head[key], a2.head[key])
    assert r1.losses == r2.losses and r1.test_score == r2.test_score
    # Another seed takes another path.
    model = init_lora(make_tiny_model(), "standard", rank=RANK, alpha=4, seed=1)
    r3 = finetune(model, tokenizer, easy_task, TrainSettings(**{**FAST, "steps": 10}), max_length=MAX_LENGTH, seed=4)
    assert r3.losses != r1.losses


def test_saved_adapter_loads_with_plain_peft(make_tiny_model, tokenizer, easy_task, tmp_path) -> None:
    from peft import PeftModel

    model = init_lora(make_tiny_model(), "standard", rank=RANK, alpha=4)
    finetune(model, tokenizer, easy_task, TrainSettings(**{**FAST, "steps": 10}), max_length=MAX_LENGTH)
    out = save_adapter(adapter_of(model), tmp_path / "easy")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["peft_type"] == "LORA"

    fresh = make_tiny_model()
    with torch.no_grad():  # the saved head, not the fresh one, must be used
        fresh.classifier.weight.normal_()
    loaded = PeftModel.from_pretrained(fresh, str(out)).eval()
    assert_close(_logits(loaded, tokenizer, easy_task.test), _logits(model, tokenizer, easy_task.test))


def test_freeze_a_leaves_a_unchanged(make_tiny_model, tokenizer, easy_task) -> None:
    model = init_lora(make_tiny_model(), "standard", rank=RANK, alpha=4)
    a0 = _a(model)
    finetune(model, tokenizer, easy_task, TrainSettings(**{**FAST, "steps": 10}, constraint="freeze_A"), max_length=MAX_LENGTH)
    after = lora_from_model(model)
    for name, lw in after.layers.items():
        assert torch.equal(lw.A, a0[name])
        assert lw.B.abs().max() > 0  # B was trained


def test_project_keeps_a_in_the_subspace(make_tiny_model, tokenizer, easy_task, random_orthonormal) -> None:
    gen = torch.Generator().manual_seed(0)
    subspaces = {n: random_orthonormal(2 * RANK, 32, gen) for n in TINY_TARGETS}
    model = init_lora(make_tiny_model(), "osrm", rank=RANK, alpha=4,
                      subspaces={n: u[:RANK] for n, u in subspaces.items()})
    a0 = _a(model)
    finetune(model, tokenizer, easy_task, TrainSettings(**{**FAST, "steps": 10}, constraint="project"), max_length=MAX_LENGTH,
             subspaces=subspaces)
    for name, a in _a(model).items():
        u = subspaces[name]
        assert (a - a0[name]).abs().max() > 1e-3  # A moved ...
        assert_close(a @ u.T @ u, a, atol=1e-10, rtol=0)  # ... but only within the row space


def test_project_and_penalty_need_their_inputs(make_tiny_model, tokenizer, easy_task) -> None:
    model = init_lora(make_tiny_model(), "standard", rank=RANK, alpha=4)
    with pytest.raises(ValueError, match="subspaces"):
        finetune(model, tokenizer, easy_task, TrainSettings(steps=1, constraint="project"))
    with pytest.raises(ValueError, match="penalty_moments"):
        finetune(model, tokenizer, easy_task, TrainSettings(steps=1, constraint="penalty"))
    with pytest.raises(ValueError, match="own_moments"):
        finetune(model, tokenizer, easy_task, TrainSettings(steps=1, constraint="penalty_ratio"),
                 penalty_moments={n: torch.eye(32, dtype=torch.float64) for n in _a(model)})
    with pytest.raises(ValueError, match="no LoRA layers"):
        finetune(make_tiny_model(), tokenizer, easy_task, TrainSettings(steps=1))


def test_penalty_lowers_the_energy_in_the_others_subspace(
    make_tiny_model, tokenizer, easy_task, random_orthonormal
) -> None:
    gen = torch.Generator().manual_seed(1)
    moments = {}
    for name in TINY_TARGETS:
        q = random_orthonormal(32, 32, gen)
        moments[name] = q.T @ torch.diag(torch.logspace(0, -3, 32, dtype=torch.float64)) @ q

    def energy(model) -> float:
        return sum(float(torch.trace(a @ moments[n] @ a.T)) for n, a in _a(model).items())

    results = {}
    for constraint in ("none", "penalty"):
        model = init_lora(make_tiny_model(), "standard", rank=RANK, alpha=4)
        start = energy(model)
        finetune(model, tokenizer, easy_task,
                 TrainSettings(**{**FAST, "steps": 20}, constraint=constraint, penalty_beta=1.0), max_length=MAX_LENGTH,
                 penalty_moments=moments)
        results[constraint] = energy(model)
    assert results["penalty"] < 0.5 * results["none"]
    assert results["penalty"] < start


def _moments(gen, random_orthonormal, decay: tuple[float, float]) -> dict[str, torch.Tensor]:
    out = {}
    for name in TINY_TARGETS:
        q = random_orthonormal(32, 32, gen)
        out[name] = q.T @ torch.diag(torch.logspace(*decay, 32, dtype=torch.float64)) @ q
    return out


def test_penalty_ratio_matches_a_naive_reference(make_tiny_model, random_orthonormal) -> None:
    from osrm_core.constraints import get_constraint
    from osrm_core.train import _lora_layers

    gen = torch.Generator().manual_seed(2)
    rest, own = _moments(gen, random_orthonormal, (0, -3)), _moments(gen, random_orthonormal, (1, -1))
    model = init_lora(make_tiny_model(), "standard", rank=RANK, alpha=4)
    active = get_constraint("penalty_ratio").prepare(_lora_layers(model), moments=rest, own_moments=own)
    expected = 0.0
    for name, a in _a(model).items():
        a = a.double()
        r, o = rest[name] / (rest[name].trace() / 32), own[name] / (own[name].trace() / 32)
        expected += float(torch.trace(a @ r @ a.T) / torch.trace(a @ o @ a.T))
    assert_close(float(active.loss()), expected, rtol=1e-5, atol=0)
    # the ratio does not change with A's scale: it cannot be lowered by shrinking A
    with torch.no_grad():
        for layer in _lora_layers(model).values():
            layer.lora_A["default"].weight.mul_(3.0)
    assert_close(float(active.loss()), expected, rtol=1e-5, atol=0)


def test_penalty_ratio_moves_A_towards_own_energy_without_shrinking_it(
    make_tiny_model, tokenizer, easy_task, random_orthonormal
) -> None:
    gen = torch.Generator().manual_seed(3)
    rest, own = _moments(gen, random_orthonormal, (0, -3)), _moments(gen, random_orthonormal, (0, -3))

    def ratio_and_norm(model) -> tuple[float, float]:
        a = _a(model)
        ratio = sum(float(torch.trace(x @ rest[n] @ x.T) / torch.trace(x @ own[n] @ x.T)) for n, x in a.items())
        return ratio, sum(float(x.norm()) for x in a.values())

    results = {}
    for constraint in ("none", "penalty_ratio"):
        model = init_lora(make_tiny_model(), "standard", rank=RANK, alpha=4)
        start = ratio_and_norm(model)
        finetune(model, tokenizer, easy_task,
                 TrainSettings(**{**FAST, "steps": 20}, constraint=constraint, penalty_beta=1.0), max_length=MAX_LENGTH,
                 penalty_moments=rest, own_moments=own)
        results[constraint] = ratio_and_norm(model)
    assert results["penalty_ratio"][0] < 0.5 * results["none"][0]
    assert results["penalty_ratio"][0] < 0.5 * start[0]
    assert results["penalty_ratio"][1] > 0.5 * start[1]  # A kept its size


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0),
        ("batch_size", 0),
        ("lr", 0.0),
        ("head_lr", -1.0),
        ("a_lr_scale", -0.5),
        ("weight_decay", -1.0),
        ("warmup_ratio", 1.0),
        ("max_grad_norm", 0.0),
        ("penalty_beta", -1e-3),
        ("constraint", "orthogonal"),
        ("length_group", 0),
        ("b_density", 0.0),
        ("b_density", 1.5),
        ("calibration", 0.0),
        ("calibration", 1.0),
    ],
)
def test_train_config_rejects(field, value) -> None:
    with pytest.raises(ValueError, match=field):
        TrainSettings(**{field: value})


def _b(peft_model) -> dict[str, torch.Tensor]:
    return {n: lw.B.clone() for n, lw in lora_from_model(peft_model).layers.items()}


def test_sparse_b_keeps_a_and_the_densest_b_entries_after_calibration(
    make_tiny_model, tokenizer, easy_task, tmp_path
) -> None:
    """LoRI: A does not move; B trains densely for the calibration steps, then exactly
    ``round(b_density * entries)`` entries (over all layers) are nonzero until the end, always
    the same ones, and the saved peft adapter holds zeros elsewhere."""
    from safetensors.torch import load_file

    model = init_lora(make_tiny_model(), "standard", rank=RANK, alpha=4)
    a0 = _a(model)
    config = TrainSettings(**{**FAST, "steps": 10}, constraint="sparse_B", b_density=0.1, calibration=0.3)
    assert config.mask_step() == 3
    total = sum(b.numel() for b in _b(model).values())
    keep = round(0.1 * total)
    nonzero: list[int] = []
    supports: list[dict[str, torch.Tensor]] = []

    def record(step: int, steps: int, message: str) -> None:
        b = _b(model)
        nonzero.append(sum(int((x != 0).sum()) for x in b.values()))
        supports.append({n: x != 0 for n, x in b.items()})

    result = finetune(model, tokenizer, easy_task, config, max_length=MAX_LENGTH, progress=record)
    assert np.isfinite(result.losses).all()
    assert nonzero[:2] == [total, total]  # dense during calibration
    assert nonzero[2:] == [keep] * 8  # from the calibration step to the end
    for later in supports[3:]:
        for n, support in later.items():
            assert torch.equal(support, supports[2][n])  # the mask stays fixed
    for name, a in _a(model).items():
        assert torch.equal(a, a0[name])

    out = save_adapter(adapter_of(model), tmp_path / "easy")
    saved = {k: v for k, v in load_file(str(out / "adapter_model.safetensors")).items() if "lora_B" in k}
    assert len(saved) == len(TINY_TARGETS)
    assert sum(int((v != 0).sum()) for v in saved.values()) == keep
    for name, support in supports[-1].items():
        key = next(k for k in saved if name in k)
        assert (saved[key][~support] == 0).all()


def test_b_masks_are_global_over_layers() -> None:
    """The kept entries are the largest of all layers together, not a share of each layer."""
    from osrm_core.constraints import b_masks

    gen = torch.Generator().manual_seed(0)
    small, large = torch.randn(8, 4, generator=gen), 100 * torch.randn(8, 4, generator=gen)
    masks = b_masks({"small": small, "large": large}, 0.25)  # 16 of 64 entries
    assert int(masks["small"].sum()) == 0 and int(masks["large"].sum()) == 16
    top = large.abs().flatten().topk(16).values.min()
    assert (large.abs()[masks["large"].bool()] >= top).all()
    assert int(b_masks({"small": small}, 1.0)["small"].sum()) == 32
    assert int(b_masks({"small": small}, 1e-6)["small"].sum()) == 1  # at least one entry


@pytest.mark.parametrize(("field", "value", "allowed"),
                         [("b_density", 0.0, "(0, 1]"), ("b_density", 1.01, "(0, 1]"),
                          ("calibration", 1.0, "(0, 1)"), ("calibration", -0.1, "(0, 1)")])
def test_sparse_b_settings_out_of_range_are_one_line(field, value, allowed) -> None:
    from osrm_core.settings import ConfigError, validate_settings

    with pytest.raises(ConfigError) as err:
        validate_settings(TrainSettings, {"constraint": "sparse_B", field: value}, "train")
    assert str(err.value) == f"train: {field}: {field} must be in {allowed}, got {value!r}"


def test_sparse_b_is_a_study_variant(tiny_model_dir) -> None:
    """``{init: standard, constraint: sparse_B, rank: 32}`` and the recipe with sparse B are study
    variants; their run configs train with sparse_B and the base's b_density and calibration."""
    from test_pipeline import tiny_config

    from osrm_core.study import StudyConfig, variant_config, variant_name, variants

    base = tiny_config(tiny_model_dir, train={"steps": 8, "b_density": 0.2, "calibration": 0.25})
    study = StudyConfig.model_validate({
        "base": base.model_dump(), "inits": ["standard"], "constraints": ["none"], "seeds": [0],
        "sample_sizes": [base.samples], "ranks": [base.rank], "a_lr_scales": [1.0],
        "variants": [{"init": "standard", "constraint": "sparse_B", "rank": 32},
                     {"init": "osrm_gen", "constraint": "sparse_B", "rank": 32}]})
    names = {variant_name(v, base.train.lr): v for v in variants(study)}
    assert "standard-sparse_B-n12-r32-a1-s0" in names and "osrm_gen-sparse_B-n12-r32-a1-s0" in names
    config = variant_config(study, names["osrm_gen-sparse_B-n12-r32-a1-s0"])
    assert (config.train.constraint, config.rank, config.train.b_density, config.train.calibration) == \
        ("sparse_B", 32, 0.2, 0.25)


def test_a_study_variant_can_set_its_own_sparse_b_settings(tiny_model_dir) -> None:
    from test_pipeline import tiny_config

    from osrm_core.settings import ConfigError, validate_settings
    from osrm_core.study import StudyConfig, VariantSpec, variant_config, variant_name, variants

    base = tiny_config(tiny_model_dir, train={"steps": 8})
    study = StudyConfig(base=base, inits=[], seeds=[0], variants=[
        VariantSpec(init="standard", constraint="sparse_B", rank=32),
        VariantSpec(init="standard", constraint="sparse_B", rank=32, b_density=0.05, calibration=0.2)])
    found = {variant_name(v, base.train.lr): v for v in variants(study)}
    assert set(found) == {"standard-sparse_B-n12-r32-a1-s0", "standard-sparse_B-n12-r32-a1-d0.05-c0.2-s0"}
    own = variant_config(study, found["standard-sparse_B-n12-r32-a1-d0.05-c0.2-s0"]).train
    assert (own.b_density, own.calibration) == (0.05, 0.2)
    default = variant_config(study, found["standard-sparse_B-n12-r32-a1-s0"]).train
    assert (default.b_density, default.calibration) == (0.1, 0.1)
    with pytest.raises(ConfigError, match=r"^variants: b_density: b_density must be in \(0, 1\], got 2.0$"):
        validate_settings(VariantSpec, {"init": "standard", "constraint": "sparse_B", "b_density": 2}, "variants")
    with pytest.raises(ConfigError, match="b_density applies to constraint sparse_B only, not 'freeze_A'"):
        validate_settings(VariantSpec, {"init": "standard", "constraint": "freeze_A", "b_density": 0.2}, "variants")


def test_pissa_adapter_reproduces_the_model_on_the_original_base(
    make_tiny_model, tokenizer, easy_task, tmp_path
) -> None:
    from peft import PeftModel

    model = init_lora(make_tiny_model(dtype=torch.float32), "pissa", rank=RANK, alpha=4)
    initial = adapter_of(model)
    base = model.get_base_model()
    original = make_tiny_model(dtype=torch.float32)
    name = TINY_TARGETS[0]
    # PiSSA moved the principal part of W0 into the adapter: the base weight is a residual now.
    assert not torch.allclose(base.get_submodule(name).base_layer.weight, original.get_submodule(name).weight)
    finetune(model, tokenizer, easy_task, TrainSettings(**{**FAST, "steps": 10}), max_length=MAX_LENGTH)

    saved = adapter_of(model, initial)
    assert saved.layers[name].rank == 2 * RANK
    out = save_adapter(saved, tmp_path / "pissa")
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2 * RANK
    loaded = PeftModel.from_pretrained(original, str(out)).eval()
    assert_close(
        _logits(loaded, tokenizer, easy_task.test),
        _logits(model, tokenizer, easy_task.test),
        atol=1e-5,
        rtol=1e-4,
    )


def _varied_split(n: int) -> Split:
    """Examples of 1 to 12 words: lengths that padding makes expensive."""
    rng = np.random.default_rng(1)
    return Split([" ".join(["good"] * int(k)) for k in rng.integers(1, 13, n)], np.arange(n) % 2)


def _padding(tokenizer, split: Split, batches: list[np.ndarray]) -> int:
    lengths = np.array([len(x) for x in tokenizer(split.text, truncation=True, max_length=16)["input_ids"]])
    return int(sum(lengths[b].max() * len(b) - lengths[b].sum() for b in batches))


def test_length_groups_pad_less_and_keep_each_epoch(tokenizer) -> None:
    split = _varied_split(64)
    grouped = TrainSettings(steps=8, batch_size=8, length_group=8)
    plain = TrainSettings(steps=8, batch_size=8, length_group=1)
    a = list(training_batches(tokenizer, split, grouped, max_length=16, seed=3))
    b = list(training_batches(tokenizer, split, plain, max_length=16, seed=3))
    again = training_batches(tokenizer, split, grouped, max_length=16, seed=3)
    assert [x.tolist() for x in a] == [x.tolist() for x in again]
    assert sorted(np.concatenate(a).tolist()) == list(range(64))  # one epoch, each example once
    assert _padding(tokenizer, split, a) < _padding(tokenizer, split, b) / 3
    # length_group=1 draws the batches of the plain loop: slices of seeded permutations
    rng = np.random.default_rng(3)
    perm = rng.permutation(64)
    assert [x.tolist() for x in b] == [perm[k * 8 : (k + 1) * 8].tolist() for k in range(8)]


def test_length_groups_train_repeatably(make_tiny_model, tokenizer) -> None:
    task = TaskData("varied", _varied_split(48), _varied_split(16), ["a", "b"])
    config = TrainSettings(**{**FAST, "steps": 12, "length_group": 4})
    runs = []
    for _ in range(2):
        model = init_lora(make_tiny_model(), "standard", rank=RANK, alpha=4, seed=0)
        runs.append((finetune(model, tokenizer, task, config, max_length=16).losses, _a(model)))
    assert runs[0][0] == runs[1][0]
    for name in runs[0][1]:
        assert torch.equal(runs[0][1][name], runs[1][1][name])


def test_drift_records_exact_energy_on_every_task(make_tiny_model, tokenizer, easy_task, tiny_stats, tiny_tasks) -> None:
    from osrm_core.stats import collect_feature_stats

    model = init_lora(make_tiny_model(), "standard", rank=RANK, alpha=4)
    stats = {"easy": collect_feature_stats(model.get_base_model(), tokenizer, easy_task, max_samples=None,
                                           max_length=MAX_LENGTH),
             tiny_tasks[1].name: tiny_stats[1]}
    initial = lora_from_model(model)
    result = finetune(model, tokenizer, easy_task, TrainSettings(**{**FAST, "steps": 10}), max_length=MAX_LENGTH,
                      drift_stats=stats, drift_every=4)
    drift = pd.DataFrame(result.drift)
    assert sorted(set(drift["step"])) == [0, 4, 8, 10] and len(drift) == 8
    assert set(drift.loc[drift["own"], "data"]) == {"easy"}
    for data, st in stats.items():  # naive float64 reference at step 0 (before any update) and at the end
        for step, adapter in ((0, initial), (10, lora_from_model(model))):
            want = sum(float(torch.trace(lw.A.double() @ st.layers[n].second_moment @ lw.A.double().T))
                       for n, lw in adapter.layers.items())
            got = drift[(drift["step"] == step) & (drift["data"] == data)]["input_energy"].item()
            assert got == pytest.approx(want, rel=1e-9)
    # B starts at zero: no output shift before training, some after.
    assert (drift.loc[drift["step"] == 0, "output_shift"] == 0).all()
    assert (drift.loc[drift["step"] == 10, "output_shift"] > 0).all()
    with pytest.raises(ValueError, match="drift_every=0"):
        finetune(model, tokenizer, easy_task, TrainSettings(**{**FAST, "steps": 1}), drift_stats=stats, drift_every=0)


def test_cli_train_takes_the_sparse_b_settings() -> None:
    from osrm_core.cli import build_parser
    from osrm_core.cli_commands import _config_from_args
    from osrm_core.settings import ConfigError

    def parsed(*extra: str):
        args = build_parser().parse_args(["train", "--task", "a=demo:sentiment", "--task", "b=demo:topic",
                                          "--constraint", "sparse_B", *extra, "--out", "unused"])
        return _config_from_args(args)

    train = parsed("--b-density", "0.05", "--calibration", "0.2").train
    assert (train.constraint, train.b_density, train.calibration) == ("sparse_B", 0.05, 0.2)
    with pytest.raises(ConfigError, match=r"^command line: train.b_density: b_density must be in \(0, 1\], got 0.0$"):
        parsed("--b-density", "0")


def test_sparse_b_is_refused_with_an_init_that_moves_the_base() -> None:
    from osrm_core.constraints import check_constraint

    check_constraint("sparse_B", ["standard", "osrm_gen", "eva"])
    with pytest.raises(ValueError, match="per_init.pissa.constraint 'sparse_B' keeps B sparse, but init 'pissa' moves"):
        check_constraint("sparse_B", ["pissa"], field="per_init.pissa.constraint")
