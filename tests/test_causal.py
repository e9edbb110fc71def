"""Causal-LM adapters end to end: tiny random LLaMA and GPT-2 causal LMs saved to disk,
adapters made by plain peft (task_type CAUSAL_LM), tasks of plain texts (.txt). Each task is
scored by its mean token loss, checked against the loss that transformers computes itself; the
command line diagnoses, sweeps (loss-scored) and merges, and the merged adapter loads with
plain peft."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.testing import assert_close

from osrm_core.adapters import load_adapter
from osrm_core.evaluate import SweepEngine, best_points
from osrm_core.task_spec import parse_task_spec
from osrm_core.workflows import load_base_for

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
TEXTS = {
    "reviews": [f"the film number {i} was {w} and the plot was {v}" for i, (w, v) in
                enumerate([("great", "slow"), ("awful", "fast"), ("fine", "long"), ("good", "short")] * 4)],
    "questions": [f"who wrote book {i} and where did {w} live" for i, w in
                  enumerate(["anna", "bob", "carla", "dan"] * 4)],
}
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def osrm(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "osrm_core.cli", *map(str, args)],
                          capture_output=True, text=True, env=ENV, timeout=300)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator([t for ts in TEXTS.values() for t in ts],
                             trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="[EOS]", pad_token="[PAD]",
                                   model_input_names=["input_ids", "attention_mask"])


def _causal_lm(arch: str, tok):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id,
                  eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=64, **common))
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common))


def _build(arch: str, root):
    """A saved tiny causal LM, two peft CAUSAL_LM adapters on it (on other layers for LLaMA:
    q/v and q/k/v) and a .txt task per adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tok = _tokenizer()
    _causal_lm(arch, tok).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    out = {"arch": arch, "root": root, "base": root / "base", "adapters": {}, "tasks": {}}
    for seed, name in enumerate(TEXTS):
        targets = TARGETS[arch] + (["k_proj"] if arch == "llama" and seed else [])
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "base"),
                               LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=targets))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        model.save_pretrained(root / name)
        out["adapters"][name] = root / name
        (root / f"{name}.txt").write_text("\n".join(TEXTS[name]) + "\n", encoding="utf-8")
        out["tasks"][name] = root / f"{name}.txt"
    return out


@pytest.fixture(scope="module", params=list(TARGETS))
def setup(request, tmp_path_factory):
    return _build(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _build("llama", tmp_path_factory.mktemp("llama-cli"))


def test_single_task_loss_is_the_token_loss_of_peft(setup) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapters = {n: load_adapter(p) for n, p in setup["adapters"].items()}
    model, tok = load_base_for(adapters, str(setup["base"]))
    assert type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    tasks = [parse_task_spec(str(p), name=n) for n, p in setup["tasks"].items()]
    engine = SweepEngine(model, tok, tasks, adapters, batch_size=5)
    try:
        single = engine.single_task_scores()
        df = engine.sweep(["task_arithmetic", "ties"], [0.5, 1.0], single=single)
    finally:
        engine.restore()
    for task in tasks:
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup["base"]),
                                               str(setup["adapters"][task.name])).eval()
        total = count = 0.0
        with torch.no_grad():
            for text in task.test.text:  # one text at a time: no padding
                ids = tok(text, return_tensors="pt")["input_ids"]
                total += float(peft_model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
                count += ids.shape[1] - 1
        assert single[task.name] == pytest.approx(total / count, rel=1e-5)
    assert set(df.metric) == {"loss"}
    assert_close(torch.tensor(df.perplexity.to_numpy()), torch.tensor(df.score.map(math.exp).to_numpy()))
    assert_close(torch.tensor(df.normalized.to_numpy()), torch.tensor((df.score / df.single).to_numpy()))
    best = best_points(df)  # lower is better for a loss
    for method, row in best.set_index("method").iterrows():
        assert row.normalized_avg == df[df.method == method].groupby("lambda")["normalized"].mean().min()


@pytest.mark.slow
def test_cli_diagnose_sweep_merge(llama) -> None:
    """``osrm diagnose``, ``osrm sweep`` and ``osrm merge`` exit 0 on the causal LM; the merged
    adapter loads with plain peft on the base and adds the merged delta."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    from osrm_core.export import merge_adapters

    setup = llama
    root, base = setup["root"], setup["base"]
    common = ["--model", base, *[a for n, p in setup["adapters"].items() for a in ("--adapter", f"{n}={p}")],
              *[a for n, p in setup["tasks"].items() for a in ("--task", f"{n}={p}")]]
    with ThreadPoolExecutor(3) as pool:
        diagnose = pool.submit(osrm, "diagnose", *common, "--samples", 8, "--json")
        sweep = pool.submit(osrm, "sweep", *common, "--methods", "task_arithmetic", "regmean",
                            "--lambdas", 0.5, 1.0, "--samples", 8, "--json")
        merge = pool.submit(osrm, "merge", *common, "--method", "task_arithmetic", "--lambda", 0.7,
                            "--out", root / "merged")
    for result in (diagnose.result(), sweep.result(), merge.result()):
        assert result.returncode == 0, result.stderr
    coverage = {r["adapter"]: r["layers"] for r in json.loads(diagnose.result().stdout)["coverage"]}
    assert coverage == {"reviews": 4, "questions": 6}
    rows = json.loads(sweep.result().stdout)["sweep"]
    assert {r["metric"] for r in rows} == {"loss"} and {r["method"] for r in rows} == {"task_arithmetic", "regmean"}
    assert "rank" in merge.result().stdout and "(exact)" in merge.result().stdout

    config = json.loads((root / "merged" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    adapters = {n: load_adapter(p) for n, p in setup["adapters"].items()}
    merged = merge_adapters(adapters, "task_arithmetic", lam=0.7)
    expected = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for name, delta in merged.items():
            expected.get_submodule(name).weight += delta
    ids = _tokenizer()(TEXTS["reviews"][:2], return_tensors="pt")["input_ids"]
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(root / "merged")).eval()
    assert_close(loaded(input_ids=ids).logits, expected(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    auto = AutoPeftModelForCausalLM.from_pretrained(str(root / "merged")).eval()
    assert_close(auto(input_ids=ids).logits, expected(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_advise_scores_held_out_texts_by_their_token_loss(llama) -> None:
    """``advise`` on causal-LM adapters and plain texts: every candidate's held-out score is the
    mean token loss of the merged model on the held-out texts (transformers' own loss, text by
    text, recomputed here), lower is better, and the recommendation has the best validation loss."""
    from transformers import AutoModelForCausalLM

    from osrm_core.advisor import advise, split_samples
    from osrm_core.export import merge_adapters

    adapters = {n: load_adapter(p) for n, p in llama["adapters"].items()}
    model, tok = load_base_for(adapters, str(llama["base"]))
    tasks = [parse_task_spec(str(p), name=n, seed=0) for n, p in llama["tasks"].items()]
    advice = advise(model, tok, adapters, tasks, methods=["task_arithmetic"], lambdas=[0.5, 1.0], budget=2)
    assert advice.lower_is_better and set(advice.candidates["metric"]) == {"loss"}
    chosen = advice.summary.loc[advice.summary["validation"].idxmax()]
    assert advice.recommended["candidate"] == chosen["candidate"]
    rec = advice.recommended
    merged = merge_adapters(adapters, rec["method"], weights=rec["weights"])
    reference = AutoModelForCausalLM.from_pretrained(llama["base"]).eval()
    with torch.no_grad():
        for name, delta in merged.items():
            reference.get_submodule(name).weight += delta
    for task in tasks:
        held = split_samples(task, seed=0)[1].test
        total = count = 0.0
        for text in held.text:
            ids = tok(text, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                loss = reference(input_ids=ids, labels=ids).loss  # mean over the text's next tokens
            total, count = total + float(loss) * (ids.shape[1] - 1), count + ids.shape[1] - 1
        assert advice.recommended["heldout_per_task"][task.name] == pytest.approx(total / count, rel=1e-4)
    assert "held-out" in advice.reason


@pytest.mark.slow
def test_app_diagnosis_page_advises_causal_lm_adapters(llama, tmp_path, monkeypatch) -> None:
    """The Adapter diagnosis page: two LLaMA CAUSAL_LM adapters on other layers (zips made from
    peft's folders), plain texts; diagnosis over the union, loss-scored advice that fills the
    merge form, and the merged adapter built."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from app_helpers import zip_directory

    monkeypatch.delenv("OSRM_RUN_DIR", raising=False)
    monkeypatch.setenv("OSRM_RUNS_ROOT", str(tmp_path / "runs"))
    at = AppTest.from_file(str(Path(__file__).parents[1] / "app.py"), default_timeout=300).run()
    at.switch_page("pages/5_Adapter_diagnosis.py").run()
    at.text_input(key="diag_model").set_value(str(llama["base"])).run()
    up = at.file_uploader(key="diag_files")
    for name, folder in llama["adapters"].items():
        up.upload(f"{name}.zip", zip_directory(folder), "application/zip")
    at.run()
    for name in llama["adapters"]:
        at.text_area(key=f"diag_texts_{name}").set_value("\n".join(TEXTS[name]))
    at.run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    assert any("union" in c.value for c in at.caption)
    at.text_input(key="diag_lambdas").set_value("0.5, 1.0")
    at.number_input(key="diag_budget").set_value(2)
    at.button(key="diag_advise_button").click().run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    advice = at.session_state["diag_advice"]["advice"]
    assert set(advice.candidates["metric"]) == {"loss"}
    rec = advice.recommended
    assert at.session_state["diag_merge_method"] == rec["method"]
    assert at.session_state["diag_merge_weights"] == ", ".join(f"{w:g}" for w in rec["weights"])
    at.button(key="diag_merge_button").click().run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    assert at.session_state["diag_merged"]["zip"][:2] == b"PK"
