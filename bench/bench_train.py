"""Item 3: fine-tuning throughput, ``finetune`` against Hugging Face ``Trainer``.

Both sides train the same peft model (``init_lora(..., "standard", rank=8)`` on a copy of the
default model, same seed) for the same number of steps with the same batch size, on exactly the
same examples in the same order (our loop's seeded permutation, handed to ``Trainer`` through a
sequential sampler) and the same dynamic padding (``DataCollatorWithPadding`` pads a batch to its
longest example, as our tokenizer call does), so both see the same tokens and the same tensor
shapes. AdamW, linear warm-up and decay, gradient clipping at 1.0 on both sides.

Throughput is real (non-padding) tokens per second of the training loop: our
``TrainResult.seconds`` (the loop, including its per-step tokenization; not the evaluation
after it) and, for ``Trainer``, ``on_train_begin`` to ``on_train_end``. Goal: ours / Trainer
>= 1 (not slower).
"""

from __future__ import annotations

import copy
import tempfile
import time

import numpy as np

from bench._common import Context, Row, interleave, median, paired_ratio, rounded

BATCH_SIZE = 16
MAX_LENGTH = 128
LR = 2e-3


def _settings(ctx: Context) -> dict:
    if ctx.quick:
        return {"steps": 10, "repeats": max(ctx.repeats, 5)}
    return {"steps": 30, "repeats": max(ctx.repeats, 5)}


def our_order(n: int, steps: int, batch_size: int, seed: int) -> list[int]:
    """The example indices our ``finetune`` draws, step after step (see osrm_core.train)."""
    rng = np.random.default_rng(seed)
    order = np.empty(0, dtype=np.int64)
    out: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(n)])
        idx, order = order[:batch_size], order[batch_size:]
        out += [int(i) for i in idx]
    return out


def train_row(ctx: Context) -> Row:
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import (
        DataCollatorWithPadding,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from osrm_core.demo import demo_task
    from osrm_core.inits import init_lora
    from osrm_core.settings import TrainSettings
    from osrm_core.train import finetune

    s = _settings(ctx)
    steps = s["steps"]
    base, tok = ctx.base_model()
    task = demo_task("sentiment", seed=0, n_train=max(200, steps * BATCH_SIZE), n_test=10)
    config = TrainSettings(steps=steps, batch_size=BATCH_SIZE, lr=LR)

    order = our_order(len(task.train), steps, BATCH_SIZE, 0)
    examples = []
    for i in order:
        pair = None if task.train.text_pair is None else task.train.text_pair[i]
        enc = tok(task.train.text[i], pair, truncation=True, max_length=MAX_LENGTH)
        examples.append({**enc, "labels": int(task.train.label[i])})
    tokens = sum(len(e["input_ids"]) for e in examples)
    collator = DataCollatorWithPadding(tok)

    class InOrder(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.start

    seen: dict[str, list[int]] = {"ours": [], "trainer": []}

    def ours() -> float:
        model = init_lora(copy.deepcopy(base), "standard", rank=8, alpha=16, seed=0)
        result = finetune(model, tok, task, config, max_length=MAX_LENGTH, seed=0, max_test=10)
        seen["ours"].append(result.tokens)
        return result.tokens / result.seconds

    def trainer() -> float:
        model = init_lora(copy.deepcopy(base), "standard", rank=8, alpha=16, seed=0)
        clock = Clock()
        with tempfile.TemporaryDirectory(prefix="osrm-bench-trainer-") as out:
            args = TrainingArguments(
                output_dir=out,
                per_device_train_batch_size=BATCH_SIZE,
                max_steps=steps,
                learning_rate=LR,
                warmup_steps=config.warmup_ratio,  # < 1: a ratio of the steps
                lr_scheduler_type="linear",
                weight_decay=0.0,
                max_grad_norm=config.max_grad_norm,
                logging_strategy="no",
                save_strategy="no",
                report_to="none",
                disable_tqdm=True,
                dataloader_num_workers=0,
                use_cpu=not torch.cuda.is_available(),
                seed=0,
            )
            hf = InOrder(
                model=model, args=args, train_dataset=examples, data_collator=collator, callbacks=[clock]
            )
            hf.remove_callback(PrinterCallback)  # it prints the final metrics to stdout
            hf.train()
        seen["trainer"].append(tokens)
        return tokens / clock.seconds

    # Throughputs, so the figure is ours / Trainer (>= 1 means not slower).
    samples = interleave({"trainer": trainer, "ours": ours}, s["repeats"])
    if set(seen["ours"]) != {tokens}:
        raise RuntimeError(f"the two loops saw different tokens: ours {seen['ours']}, Trainer {tokens}")
    return Row(
        "3",
        "fine-tuning tokens/s: finetune / HF Trainer",
        paired_ratio(samples["ours"], samples["trainer"]),
        ">=",
        1.0,
        ours=median(samples["ours"]),
        baseline=median(samples["trainer"]),
        repeats=s["repeats"],
        detail=(
            f"default MiniLM + LoRA r=8 (query/value) + head; {steps} steps x batch {BATCH_SIZE}, same "
            f"{tokens} real tokens in the same order and padding; ours/baseline columns in tokens/s"
        ),
        command=ctx.cmd("3"),
        samples=rounded(samples, 1),
    )


def run(ctx: Context, items: set[str]) -> list[Row]:
    if "3" not in items:
        return []
    ctx.log("3 fine-tuning throughput")
    return [train_row(ctx)]
