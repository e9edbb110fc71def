"""The realistic test bed, built offline: a LLaMA of Llama-3.2-1B's shape (or a shrunk one for
the tests) with random weights saved as sharded safetensors, a word-level tokenizer trained in
process, two tasks of plain texts and plain-peft LoRA adapters on all seven linear kinds.

Only ``transformers``, ``tokenizers`` and ``peft`` build it (``LoraConfig``,
``get_peft_model``, ``save_pretrained``): none of our code writes the adapters.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

#: Llama-3.2-1B's config (its published ``config.json``): hidden 2048, 16 layers, MLP 8192,
#: 32 heads, 8 KV heads (GQA), vocabulary 128256, tied embeddings.
LLAMA_3_2_1B = {
    "hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "tie_word_embeddings": True,
    "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
}
#: Llama-3-8B's config, for the GPU run (``bench/gpu.sh scale``).
LLAMA_3_8B = {**LLAMA_3_2_1B, "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
              "head_dim": 128, "tie_word_embeddings": False}
#: The same builder at test size (seconds on a CPU).
SMALL = {**LLAMA_3_2_1B, "hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 256,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1024}
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: The adapters' variants, taken in turn: rank, targets, rank/alpha patterns, rsLoRA.
VARIANTS = (
    {"r": 16, "lora_alpha": 32, "target_modules": list(KINDS)},
    {"r": 16, "lora_alpha": 16, "target_modules": list(KINDS), "rank_pattern": {"down_proj": 8}},
    {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    {"r": 16, "lora_alpha": 16, "target_modules": list(KINDS), "use_rslora": True,
     "alpha_pattern": {"gate_proj": 32}},
)
WORDS = 600


def _words() -> list[str]:
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    out: set[str] = set()
    while len(out) < WORDS:
        out.add("".join(rng.choice(letters, size=int(rng.integers(3, 8)))))
    return sorted(out)


def build_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over :data:`WORDS` made-up words, saved as a Hugging Face one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *_words()])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(folder))


def write_tasks(folder: Path, texts: int, tokens: int) -> dict[str, Path]:
    """Two tasks of ``texts`` lines of ``tokens`` words each, from two halves of the words."""
    words = _words()
    rng = np.random.default_rng(1)
    out = {}
    for k, name in enumerate(("a", "b")):
        pool = words[k * WORDS // 2 : (k + 1) * WORDS // 2]
        lines = [" ".join(rng.choice(pool, size=tokens)) for _ in range(texts)]
        out[name] = folder / f"{name}.txt"
        out[name].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def build_model(folder: Path, shape: dict, *, shard_size: str, dtype: torch.dtype = torch.bfloat16,
                device: str = "cpu"):
    """A random LLaMA of ``shape`` saved in ``dtype`` as sharded safetensors; returns it (on
    ``device``, where it is also drawn: an 8B model is drawn on the GPU directly in ``dtype``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    if device == "cpu":
        model = LlamaForCausalLM(config).to(dtype).eval()
    else:
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = LlamaForCausalLM(config).eval()
        finally:
            torch.set_default_dtype(default)
    model.save_pretrained(str(folder), max_shard_size=shard_size)
    return model


def build_adapters(model, folder: Path, n: int) -> dict[str, Path]:
    """``n`` plain-peft LoRA adapters on ``model`` (the :data:`VARIANTS` in turn), ``B`` drawn at
    random so that they change the model; saved as ``folder/adapter_K``."""
    from peft import LoraConfig, get_peft_model

    out = {}
    for k in range(n):
        config = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **VARIANTS[k % len(VARIANTS)])
        peft_model = get_peft_model(model, config)
        gen = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen).to(p.device) / p.shape[1] ** 0.5)
        out[f"t{k}"] = folder / f"adapter_{k}"
        peft_model.save_pretrained(str(out[f"t{k}"]))
        model = peft_model.unload()
    return out


def build_testbed(folder: str | Path, shape: dict = SMALL, *, adapters: int = 2, texts: int = 16,
                  tokens: int = 32, shard_size: str = "200KB", device: str = "cpu") -> dict:
    """Everything in ``folder``: ``model/`` (config, shards, tokenizer), ``tasks/a.txt``,
    ``tasks/b.txt`` and ``adapters/adapter_K``; returns their paths (also in ``testbed.json``)."""
    folder = Path(folder)
    (folder / "tasks").mkdir(parents=True, exist_ok=True)
    model = build_model(folder / "model", shape, shard_size=shard_size, device=device)
    build_tokenizer(folder / "model")
    paths = {
        "model": str(folder / "model"),
        "tasks": {k: str(v) for k, v in write_tasks(folder / "tasks", texts, tokens).items()},
        "adapters": {k: str(v) for k, v in build_adapters(model, folder / "adapters", adapters).items()},
    }
    (folder / "testbed.json").write_text(json.dumps(paths, indent=1), encoding="utf-8")
    return paths
