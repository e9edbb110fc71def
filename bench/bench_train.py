"""Item 3: fine-tuning throughput, ``finetune`` against Hugging Face ``Trainer``.

3.  ``finetune`` with ``length_group=1`` (batches as drawn) against ``Trainer`` on the same
    batches: the loops alone. Goal: not slower (>= 1x).
3b. ``finetune`` as it runs by default (``length_group=16``: 16 batches drawn together, sorted
    by length and cut again, so batches pad less) against the same ``Trainer`` run, on the same
    examples (the steps are a multiple of 16, so both see the same permutation prefix; the
    token counts are checked equal). Goal: >= 1.3x tokens/s.

Data: SST-2 from ``../shared/data/real`` when present (sentence lengths of real text), else the
demo sentiment task. Both sides train the same peft model (``init_lora(..., "standard", rank=8)`` on a copy of the
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

from bench._common import ROOT, Context, Row, interleave, median, paired_ratio, rounded

BATCH_SIZE = 16
MAX_LENGTH = 128
LR = 2e-3


GROUP = 16
REAL_SST2 = ROOT.parent / "shared" / "data" / "real" / "sst2"


def _settings(ctx: Context) -> dict:
    if ctx.quick:
        return {"steps": GROUP, "repeats": max(ctx.repeats, 3)}
    return {"steps": 2 * GROUP, "repeats": max(ctx.repeats, 5)}


def _task(steps: int):
    from osrm_core.demo import demo_task
    from osrm_core.task_spec import parse_task_spec

    if REAL_SST2.is_dir():
        return parse_task_spec(str(REAL_SST2), name="sst2", seed=0), "SST-2 (data/real)"
    return demo_task("sentiment", seed=0, n_train=max(200, steps * BATCH_SIZE), n_test=10), "demo sentiment"


def train_rows(ctx: Context) -> list[Row]:
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import (
        DataCollatorWithPadding,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from osrm_core.inits import init_lora
    from osrm_core.settings import TrainSettings
    from osrm_core.train import finetune, training_batches

    s = _settings(ctx)
    steps = s["steps"]
    base, tok = ctx.base_model()
    task, data = _task(steps)
    plain = TrainSettings(steps=steps, batch_size=BATCH_SIZE, lr=LR, length_group=1)
    grouped = plain.model_copy(update={"length_group": GROUP})

    order = [int(i) for idx in training_batches(tok, task.train, plain, max_length=MAX_LENGTH, seed=0) for i in idx]
    examples = _examples(tok, task.train, order)
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

    seen: dict[str, list[int]] = {"ours": [], "grouped": []}

    def ours(config: TrainSettings, side: str) -> float:
        model = init_lora(copy.deepcopy(base), "standard", rank=8, alpha=16, seed=0)
        result = finetune(model, tok, task, config, max_length=MAX_LENGTH, seed=0, max_test=10)
        seen[side].append(result.tokens)
        return result.tokens / result.seconds

    def trainer() -> float:
        model = init_lora(copy.deepcopy(base), "standard", rank=8, alpha=16, seed=0)
        clock = Clock()
        with tempfile.TemporaryDirectory(prefix="osrm-bench-trainer-") as out:
            args = TrainingArguments(  # warmup_steps < 1: a ratio of the steps
                output_dir=out, per_device_train_batch_size=BATCH_SIZE, max_steps=steps, learning_rate=LR,
                warmup_steps=plain.warmup_ratio, lr_scheduler_type="linear", weight_decay=0.0,
                max_grad_norm=plain.max_grad_norm, logging_strategy="no", save_strategy="no", report_to="none",
                disable_tqdm=True, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), seed=0)
            hf = InOrder(model=model, args=args, train_dataset=examples, data_collator=collator, callbacks=[clock])
            hf.remove_callback(PrinterCallback)  # it prints the final metrics to stdout
            hf.train()
        return tokens / clock.seconds

    # Throughputs, so the figures are ours / Trainer (>= 1 means not slower).
    samples = interleave({"trainer": trainer, "ours": lambda: ours(plain, "ours"),
                          "grouped": lambda: ours(grouped, "grouped")}, s["repeats"])
    if set(seen["ours"]) != {tokens} or set(seen["grouped"]) != {tokens}:
        raise RuntimeError(f"the loops saw different tokens: ours {seen}, Trainer {tokens}")
    detail = (f"default MiniLM + LoRA r=8 (query/value) + head; {data}; {steps} steps x batch {BATCH_SIZE}; "
              f"the same {tokens} real tokens on every side; ours/baseline columns in tokens/s")
    return [
        Row("3", "fine-tuning tokens/s: finetune (batches as drawn) / HF Trainer",
            paired_ratio(samples["ours"], samples["trainer"]), ">=", 1.0,
            ours=median(samples["ours"]), baseline=median(samples["trainer"]), repeats=s["repeats"],
            detail=detail + "; same batches, same order, same padding on both sides",
            command=ctx.cmd("3"), samples=rounded(samples, 1)),
        Row("3b", "fine-tuning tokens/s: finetune (length groups) / HF Trainer",
            paired_ratio(samples["grouped"], samples["trainer"]), ">=", 1.3,
            ours=median(samples["grouped"]), baseline=median(samples["trainer"]), repeats=s["repeats"],
            detail=detail + f"; ours groups {GROUP} batches by length (less padding), Trainer takes the "
                            "examples as drawn (its own group_by_length is not used)",
            command=ctx.cmd("3b"), samples=rounded(samples, 1)),
    ]


def _examples(tok, split, order: list[int]) -> list[dict]:
    """The examples of ``split`` in ``order``, tokenized as the Trainer's dataset."""
    examples = []
    for i in order:
        pair = None if split.text_pair is None else split.text_pair[i]
        enc = tok(split.text[i], pair, truncation=True, max_length=MAX_LENGTH)
        examples.append({**enc, "labels": int(split.label[i])})
    return examples


def run(ctx: Context, items: set[str]) -> list[Row]:
    if not items & {"3", "3b"}:
        return []
    ctx.log("3 fine-tuning throughput")
    return [r for r in train_rows(ctx) if r.item in items]
