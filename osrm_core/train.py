"""LoRA fine-tuning of one task with its own classification head, and saving the adapter.

A plain loop (AdamW, linear warm-up and decay, gradient clipping, dynamic padding) that is
repeatable from its seed. Beyond the paper's init-only OSRM it can keep ``A`` in a subspace
during training: ``freeze_A``, ``project`` (A projected back after every step) or ``penalty``
(``beta * sum_l tr(A_l S_l A_l^T) / mean_eig(S_l)`` with ``S_l`` the other tasks' second moment);
``sparse_B`` (LoRI) freezes A and, after a calibration share of the steps, trains only B's largest
entries.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from osrm_core.adapters import Adapter, LoraWeights, lora_from_model, write_adapter
from osrm_core.batching import iter_batches, length_order, move_batch
from osrm_core.constraints import get_constraint
from osrm_core.data import TaskData
from osrm_core.errors import OsrmInputError
from osrm_core.evaluate import evaluate_model
from osrm_core.models import decoder_position_ids
from osrm_core.settings import TrainSettings
from osrm_core.stats import FeatureStats

Progress = Callable[[int, int, str], None]


@dataclass
class TrainResult:
    """What a fine-tuning run gives: test score, loss curve, time."""

    task: str
    metric: str
    test_score: float
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    drift: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _lora_layers(peft_model) -> dict[str, torch.nn.Module]:
    if not hasattr(peft_model, "get_base_model"):  # a plain model: no adapters to train
        return {}
    base = peft_model.get_base_model()
    return {n: m for n, m in base.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def _lr_lambda(steps: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return f


def training_batches(tokenizer, split, config: TrainSettings, *, max_length: int, seed: int) -> Iterator[np.ndarray]:
    """The example indices of each of ``config.steps`` batches, repeatable from ``seed``.

    Examples are drawn from seeded permutations of ``split``; ``config.length_group`` batches
    at a time are sorted by tokenized length (stable), cut into batches, and those batches
    taken in a seeded random order: batches of similar lengths pad less, and every example of
    the permutation is still used once per epoch.
    """
    rng = np.random.default_rng(seed)
    n, size = len(split), config.batch_size
    order = np.empty(0, dtype=np.int64)
    for first in range(0, config.steps, config.length_group):
        count = min(config.length_group, config.steps - first)
        while len(order) < count * size:
            order = np.concatenate([order, rng.permutation(n)])
        pool, order = order[: count * size], order[count * size :]
        if count > 1:
            pool = pool[length_order(tokenizer, split, pool, max_length)]
            yield from (pool[k * size : (k + 1) * size] for k in rng.permutation(count))
        else:
            yield pool


def finetune(peft_model, tokenizer, task: TaskData, config: TrainSettings | None = None, *, max_length: int = 128,
             seed: int = 0, max_test: int | None = None, subspaces: dict[str, torch.Tensor] | None = None,
             penalty_moments: dict[str, torch.Tensor] | None = None, own_moments: dict[str, torch.Tensor] | None = None,
             drift_stats: dict[str, FeatureStats] | None = None, drift_every: int | None = None,
             distributed: bool | None = None, progress: Progress | None = None) -> TrainResult:
    """Fine-tune ``peft_model`` (from :func:`osrm_core.inits.init_lora`) on ``task`` in place.

    Parameters
    ----------
    config : TrainSettings, optional
        The fine-tuning settings (default: ``TrainSettings()``).
    max_length : int
        Tokens per example (longer ones are truncated), in training and scoring.
    seed : int
        Seeds data order and dropout; the same seed repeats a run exactly on the same device.
    max_test : int, optional
        Score on this many test examples at most.
    subspaces : dict of layer to tensor (k, d_in), optional
        Needed by ``constraint="project"``: A's rows are kept in this row space.
    penalty_moments : dict of layer to tensor (d_in, d_in), optional
        Needed by ``constraint="penalty"`` and ``"penalty_ratio"``: the other tasks' second
        moment per layer.
    own_moments : dict of layer to tensor (d_in, d_in), optional
        Needed by ``constraint="penalty_ratio"``: the task's own second moment per layer.
    drift_stats : dict of task name to FeatureStats, optional
        Record, before the first step, every ``drift_every`` steps (default ``steps // 20``,
        at least 1) and after the last, the adapter's exact energy on each task's inputs
        summed over layers (``TrainResult.drift``: ``step, data, input_energy``
        ``= sum_l tr(A S A^T)``, ``output_shift`` ``= sum_l tr(Delta_W S Delta_W^T)``, ``own``):
        its own-task energy and its interference on the other tasks as it trains.
    distributed : bool, optional
        Data-parallel training through accelerate (DDP: gradients all-reduced). Every process
        draws the same global batch of ``config.batch_size`` examples and takes every
        ``world``-th of them; the loss is weighted so that the averaged gradient is that of the
        global batch, so the run matches one process with the same batch (up to rounding; with
        dropout, in distribution only). None (default) does so whenever a process group with
        several ranks is initialized; True requires one. The test split is shared out for
        scoring too.

    Returns
    -------
    TrainResult
        With the score on the task's test split (``max_test`` examples at most); the
        same on every rank.
    """
    from osrm_core.distributed import dist_info

    config = config or TrainSettings()
    layers = _lora_layers(peft_model)
    info = dist_info()
    parallel = info.active and distributed is not False
    _check_finetune(task, config, layers, max_length, distributed, info.world if parallel else 1, drift_every)
    every = drift_every or max(1, config.steps // 20)
    constraint = get_constraint(config.constraint)
    active = constraint.prepare(layers, subspaces, penalty_moments, own_moments,  # checks what it needs first
                                b_density=config.b_density, mask_step=config.mask_step())
    device = next(peft_model.parameters()).device
    steps = _Steps.build(peft_model, config, constraint.trains_a, active, device, info.world if parallel else None)

    result = TrainResult(task.name, task.metric, float("nan"))
    start = time.perf_counter()
    if drift_stats:
        result.drift += _drift(peft_model, task.name, drift_stats, 0)
    peft_model.train()
    _run_steps(peft_model, tokenizer, task, config, steps, result, seed=seed, max_length=max_length, device=device,
               shard=(info.rank, info.world) if parallel else None, drift=(drift_stats, every), progress=progress)
    steps.close()
    peft_model.eval()
    result.seconds = time.perf_counter() - start
    if parallel and task.metric != "loss":
        result.test_score = _evaluate_sharded(peft_model, tokenizer, task, config.eval_batch_size, max_length, max_test)
    else:
        result.test_score = evaluate_model(peft_model, tokenizer, task, batch_size=config.eval_batch_size,
                                           max_length=max_length, max_test=max_test)
    return result


def _run_steps(peft_model, tokenizer, task: TaskData, config: TrainSettings, steps: _Steps, result: TrainResult, *,
               seed: int, max_length: int, device: torch.device, shard: tuple[int, int] | None,
               drift: tuple[dict | None, int], progress: Progress | None) -> None:
    """``config.steps`` optimizer steps on ``task``, each loss, the token count and the drift
    records (``drift``: the statistics and every how many steps) logged into ``result``. In a
    data-parallel job (``shard``: rank, world) every rank draws the same batches (same numpy
    seed) and takes its share; dropout differs per rank."""
    drift_stats, every = drift
    batches = training_batches(tokenizer, task.train, config, max_length=max_length, seed=seed)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + (shard[0] if shard else 0))
        for step in range(config.steps):
            idx = next(batches)
            local = idx[shard[0] :: shard[1]] if shard else idx
            batch = next(iter_batches(tokenizer, task.train, batch_size=len(local), max_length=max_length,
                                      indices=local))
            logged, tokens = steps.step(move_batch(decoder_position_ids(batch, peft_model), device),
                                        len(local) / len(idx) if shard else None, step)
            result.losses.append(logged)
            result.tokens += tokens
            if drift_stats and ((step + 1) % every == 0 or step + 1 == config.steps):
                result.drift += _drift(peft_model, task.name, drift_stats, step + 1)
            if progress:
                progress(step + 1, config.steps, f"fine-tuning {task.name}")


def _check_finetune(task: TaskData, config: TrainSettings, layers: dict, max_length: int, distributed: bool | None,
                    world: int, drift_every: int | None) -> None:
    """Refuse what :func:`finetune` cannot use, naming it (``world``: processes sharing a batch)."""
    import torch.distributed as dist

    if not isinstance(max_length, int) or max_length < 2:
        raise OsrmInputError(f"max_length={max_length!r} is not allowed: must be an integer >= 2")
    if not task.labeled:
        raise OsrmInputError(
            f"task {task.name!r} has no labels; fine-tuning a classifier needs labelled data "
            "(plain texts serve statistics, diagnosis and causal-LM scoring)"
        )
    if not layers:
        raise OsrmInputError("peft_model has no LoRA layers; build it with osrm_core.init_lora")
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise OsrmInputError(
            "distributed=True needs an initialized torch.distributed process group: launch with "
            "torchrun or accelerate launch and call osrm_core.distributed.init_distributed()"
        )
    if config.batch_size < world:
        raise OsrmInputError(
            f"batch_size={config.batch_size} is smaller than the {world} processes: each needs "
            "at least one example per step"
        )
    if drift_every is not None and (not isinstance(drift_every, int) or drift_every < 1):
        raise OsrmInputError(f"drift_every={drift_every!r} is not allowed: must be an integer >= 1")


def _param_groups(peft_model, config: TrainSettings, trains_a: bool) -> list[dict]:
    """The optimizer's groups: A (at ``lr * a_lr_scale``; frozen unless ``trains_a``), B, and
    the rest (the head, at ``head_lr``), the empty ones left out."""
    a_params, b_params, head_params = [], [], []
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        if ".lora_A." in name:
            a_params.append(p)
        elif ".lora_B." in name:
            b_params.append(p)
        else:
            head_params.append(p)
    if not trains_a:
        for p in a_params:
            p.requires_grad_(False)
        a_params = []
    groups = [
        {"params": a_params, "lr": config.lr * config.a_lr_scale},
        {"params": b_params, "lr": config.lr},
        {"params": head_params, "lr": config.head_lr or config.lr},
    ]
    return [g for g in groups if g["params"]]


@dataclass
class _Steps:
    """The optimizer steps of one fine-tuning: the model (DDP-wrapped in a data-parallel job), its
    optimizer and learning-rate schedule, and the constraint's hooks around each step."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    accelerator: object | None
    trainable: list[torch.nn.Parameter]
    active: object
    config: TrainSettings
    world: int

    @classmethod
    def build(cls, peft_model, config: TrainSettings, trains_a: bool, active, device: torch.device,
              world: int | None) -> _Steps:
        """AdamW over :func:`_param_groups` with warmup and linear decay; ``world``: the processes
        of a data-parallel job (None: one process)."""
        groups = _param_groups(peft_model, config, trains_a)
        optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        warmup = int(config.warmup_ratio * config.steps)
        # The scheduler stays on the plain optimizer: accelerate's wrapper would step it once per process.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.steps, warmup))
        model, step_optimizer, accelerator = peft_model, optimizer, None
        if world is not None:
            accelerator = _accelerator(device, world)
            model, step_optimizer = accelerator.prepare(peft_model, optimizer)
        trainable = [p for g in groups for p in g["params"]]
        return cls(model, step_optimizer, scheduler, accelerator, trainable, active, config, world or 1)

    def step(self, batch: dict, share: float | None, step: int) -> tuple[float, int]:
        """One optimizer step on ``batch`` (``share``: this rank's part of the global batch in a
        data-parallel job); returns the loss to log and the tokens of the global batch."""
        loss, logged, tokens = _step_loss(self.model, batch, self.active, self.config.penalty_beta, share,
                                          self.world, step)
        self.optimizer.zero_grad(set_to_none=True)
        if self.accelerator is not None:
            self.accelerator.backward(loss)
            self.active.before_step()
            self.accelerator.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
        else:
            loss.backward()
            self.active.before_step()
            torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.active.after_step()
        return logged, tokens

    def close(self) -> None:
        if self.accelerator is not None:
            self.accelerator.free_memory()  # drops the DDP wrapper; peft_model keeps the trained weights
            self.model = self.optimizer = None


def _step_loss(model, batch: dict, active, beta: float, share: float | None, world: int,
               step: int) -> tuple[torch.Tensor, float, int]:
    """The loss of one step to back-propagate, the loss to log and the step's tokens. In a
    data-parallel step (``share``: this rank's part of the global batch) the logged loss and the
    tokens are the global batch's."""
    from osrm_core.distributed import all_reduce_sum

    loss = model(**batch).loss
    reg = active.loss()  # the constraint's penalty, if any
    tokens = int(batch["attention_mask"].sum())
    logged = None
    if share is not None:
        # DDP averages gradients over ranks: weigh each rank's mean loss by its share of
        # the global batch so that the average is the global batch's mean-loss gradient.
        shared = torch.tensor([float(loss.detach()) * share, tokens], dtype=torch.float64)
        all_reduce_sum([shared], f"sharing the loss of step {step}")
        logged, tokens = float(shared[0]), int(shared[1])
        loss = loss * (share * world)
    if reg is not None:
        loss = loss + beta * reg
        if logged is not None:
            logged += beta * float(reg.detach())
    logged = float(loss.detach()) if logged is None else logged
    if not np.isfinite(logged):
        raise FloatingPointError(f"loss became {logged} at step {step}; lower the learning rate")
    return loss, logged, tokens


@torch.no_grad()
def _drift(peft_model, name: str, stats: dict[str, FeatureStats], step: int) -> list[dict]:
    """The adapter's energy on every task's inputs now, summed over layers (one row per task)."""
    from osrm_core.diagnostics import interference_table

    table = interference_table({name: lora_from_model(peft_model)}, stats)
    sums = table.groupby("data", sort=False)[["input_energy", "output_shift"]].sum()
    return [
        {"step": step, "data": data, "input_energy": float(row.input_energy),
         "output_shift": float(row.output_shift), "own": data == name}
        for data, row in sums.iterrows()
    ]


def _accelerator(device: torch.device, world: int):
    """An ``Accelerator`` on the process group that is already set up (DDP wrapping, backward,
    clipping); it does not move the model, which is already on this rank's device."""
    from accelerate import Accelerator
    from accelerate.state import is_initialized

    from osrm_core.distributed import DistributedError, init_distributed

    init_distributed()  # a process group set up by hand gets the environment accelerate reads
    # Once accelerate's state exists (init_distributed made it) it is reused as it is.
    accelerator = Accelerator(cpu=not is_initialized() and device.type == "cpu", device_placement=False)
    if accelerator.num_processes != world:
        raise DistributedError(
            f"accelerate sees {accelerator.num_processes} processes but the process group has {world}; "
            "launch with torchrun or accelerate launch"
        )
    return accelerator


def _evaluate_sharded(peft_model, tokenizer, task: TaskData, batch_size: int, max_length: int,
                      max_test: int | None) -> float:
    """The test score with each rank predicting every ``world``-th example (same on all ranks)."""
    from osrm_core.data import Split
    from osrm_core.distributed import all_gather_object, dist_info
    from osrm_core.evaluate import predict, score

    info = dist_info()
    test = task.test.head(max_test)
    mine = np.arange(info.rank, len(test), info.world)
    part = Split(
        [test.text[i] for i in mine],
        test.label[mine],
        None if test.text_pair is None else [test.text_pair[i] for i in mine],
    )
    pred = (
        predict(peft_model, tokenizer, part, batch_size=batch_size, max_length=max_length)
        if len(mine)
        else np.empty(0, dtype=np.int64)
    )
    gathered = all_gather_object((mine, pred), f"gathering the test predictions of {task.name!r}")
    out = np.empty(len(test), dtype=np.int64)
    for where, values in gathered:
        out[where] = values
    return score(task.metric, test.label, out)


def adapter_of(peft_model, initial: Adapter | None = None) -> Adapter:
    """The trained adapter as plain tensors, relative to the original base weights.

    ``initial`` (the adapter right after a PiSSA-style init that changed the base weights)
    turns it into a standard LoRA of twice the rank: ``A' = [A; A0]``, ``B' = [B, -B0]``.
    """
    adapter = lora_from_model(peft_model)
    if initial is None:
        return adapter
    layers = {}
    for name, lw in adapter.layers.items():
        lw0 = initial.layers[name]
        layers[name] = LoraWeights(torch.cat([lw.A, lw0.A], 0), torch.cat([lw.B, -lw0.B], 1), lw.scale)
    return Adapter(layers, adapter.head, adapter.config)


def save_adapter(adapter: Adapter, path: str | Path) -> Path:
    """Write ``adapter`` as a PEFT adapter folder (loads with ``PeftModel.from_pretrained``)."""
    return write_adapter(path, adapter.layers, adapter.config, adapter.head)
