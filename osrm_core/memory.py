"""Memory plan of a run on a large model: what each stage holds, from the model's shapes.

The statistics are exact (they are dense ``d x d`` sums); the training activations are an
estimate (Korthikanti et al., 2022: about ``34 * hidden`` bytes per token and layer for 16-bit
activations with fused attention). Used for the table in the README's "Scaling up" section and
to choose ``stats_dtype`` and ``layers_per_pass`` before a long run; on given adapters,
:func:`stats_plan` chooses the statistics of ``osrm diagnose`` and ``osrm advise`` (projected or
dense, RegMean's Gram matrices), :func:`space_plan` where the advisor's search merges (full
or core space) and :func:`check_grams` the statistics of ``osrm merge``/``sweep``, each refusing
in one line, before any work, what does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from osrm_core.errors import OsrmInputError

GiB = 1 << 30
#: Bytes per trainable parameter with AdamW in float32: weight, gradient, two moments.
ADAM_BYTES_PER_PARAM = 16
#: Bytes of saved activations per token, layer and hidden unit (16-bit, fused attention).
ACTIVATION_BYTES_PER_TOKEN_LAYER_UNIT = 34


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about a model.

    Attributes
    ----------
    hidden : int
        Width of the adapted layers' input (``hidden_size``).
    layers : int
        Transformer blocks.
    params : int
        All parameters.
    targets_per_layer : list of (d_in, d_out)
        The adapted layers of one block (``q_proj``, ``v_proj``: ``(4096, 4096)`` twice for 7B).
    inputs_per_layer : int
        Distinct inputs among them (``q_proj`` and ``v_proj`` read one: 1).
    """

    hidden: int
    layers: int
    params: int
    targets_per_layer: tuple[tuple[int, int], ...]
    inputs_per_layer: int = 1

    @classmethod
    def from_config(cls, config, targets: tuple[str, ...] = ("q_proj", "v_proj")) -> ModelShape:
        """From a LLaMA-family ``transformers`` config (``LlamaConfig``, ``MistralConfig``, ...)."""
        h, n, inter, vocab = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or h // heads
        kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
        dims = {"q_proj": (h, heads * head_dim), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (heads * head_dim, h)}
        unknown = [t for t in targets if t not in dims]
        if unknown:
            raise OsrmInputError(f"target {unknown[0]!r} is not an attention projection; known: {', '.join(dims)}")
        per_layer = sum(a * b for a, b in dims.values()) + 3 * h * inter + 2 * h
        embeddings = vocab * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
        inputs = len({"o" if t == "o_proj" else "qkv" for t in targets})
        return cls(h, n, n * per_layer + embeddings + h, tuple(dims[t] for t in targets), inputs)


def memory_plan(
    shape: ModelShape,
    *,
    rank: int = 8,
    tasks: int = 4,
    num_labels: int = 2,
    weight_bytes: int = 2,
    stats_dtype: Literal["float64", "float32"] = "float64",
    layers_per_pass: int | None = None,
    batch_size: int = 16,
    max_length: int = 128,
) -> pd.DataFrame:
    """Memory held at each stage, per process (data-parallel ranks each hold a full copy).

    Parameters
    ----------
    shape : ModelShape
    weight_bytes : int
        2 for bfloat16/float16 weights, 4 for float32.
    stats_dtype : {"float64", "float32"}
    layers_per_pass : int, optional
        Layer inputs whose statistics are held at once (None: all).
    batch_size, max_length : int
        Per process: tokens per step are ``batch_size * max_length`` at most.

    Returns
    -------
    DataFrame with columns ``stage, item, bytes, GiB, note``.
    """
    sb = stats_bytes_per_number(stats_dtype)
    if layers_per_pass is not None and layers_per_pass < 1:
        raise OsrmInputError(f"layers_per_pass must be >= 1 or None, got {layers_per_pass}")
    d = shape.hidden
    inputs = shape.inputs_per_layer * shape.layers
    held = inputs if layers_per_pass is None else min(inputs, layers_per_pass)
    per_input = (2 * d * d + d) * sb  # sum h h^T, sum of per-sample mean outer products, sum h
    tokens = batch_size * max_length
    weights = shape.params * weight_bytes
    lora = shape.layers * sum(rank * (a + b) for a, b in shape.targets_per_layer) + d * num_labels
    rows = [
        ("all", "base weights", weights, f"{shape.params / 1e9:.2f}B parameters x {weight_bytes} bytes"),
        ("statistics", "sums held on the devices", held * per_input,
         f"{held} of {inputs} layer inputs x (2 d^2 + d) x {sb} bytes ({stats_dtype})"),
        ("statistics", "per-batch scratch", 3 * tokens * d * sb,
         f"{tokens} tokens x d in {stats_dtype}: real tokens, the cast batch, its masked copy"),
        ("statistics", "file per task", inputs * per_input, "stats/<task>.safetensors (or its parts)"),
        ("OSRM init", "eigendecomposition of one layer", (tasks + 3) * d * d * 8,
         f"{tasks} tasks' d x d moments + S_rest + eigenvectors + workspace, float64, one layer at a time"),
        ("training", "LoRA weights, gradients, AdamW", lora * ADAM_BYTES_PER_PARAM,
         f"{lora / 1e6:.2f}M trainable parameters x {ADAM_BYTES_PER_PARAM} bytes"),
        ("training", "activations (estimate)", tokens * shape.layers * d * ACTIVATION_BYTES_PER_TOKEN_LAYER_UNIT,
         f"{tokens} tokens x {shape.layers} layers x {ACTIVATION_BYTES_PER_TOKEN_LAYER_UNIT} d bytes"),
    ]
    df = pd.DataFrame(rows, columns=["stage", "item", "bytes", "note"])
    peaks = [
        ("statistics", "peak (weights + sums + scratch)", weights + held * per_input + 3 * tokens * d * sb),
        ("training", "peak (weights + LoRA states + activations)",
         weights + int(df.loc[df.stage == "training", "bytes"].sum())),
    ]
    df = pd.concat([df, pd.DataFrame([(s, i, b, "") for s, i, b in peaks], columns=df.columns)], ignore_index=True)
    df.insert(3, "GiB", (df["bytes"] / GiB).round(2))
    return df


def stats_bytes_per_number(stats_dtype: str) -> int:
    """8 for ``float64`` sums, 4 for ``float32``; any other dtype is refused."""
    if stats_dtype not in ("float64", "float32"):
        raise OsrmInputError(f"stats_dtype must be 'float64' or 'float32', got {stats_dtype!r}")
    return 8 if stats_dtype == "float64" else 4


class MemoryPlanError(OsrmInputError):
    """The plan does not fit in the memory available: raised before any work."""


def available_bytes(device: str = "cpu") -> int | None:
    """Memory a new allocation can take now: free CUDA memory on a CUDA device, else the
    system's ``MemAvailable`` (Linux); None where it cannot be known."""
    import torch

    if str(device).startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


#: Linear layers of one module that read the same input (their statistics are one).
SHARED_INPUTS = {"query": "qkv", "key": "qkv", "value": "qkv", "q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv",
                 "gate_proj": "gate_up", "up_proj": "gate_up"}


def dense_stats_bytes(widths: dict[str, int], tasks: int, stats_dtype: str = "float64", *,
                      sample_means: bool = True) -> int:
    """Bytes of the dense statistics (``sum h h^T``, the sample means' outer products, ``sum h``)
    of ``tasks`` tasks at the layers ``widths`` (name to ``d_in``); the layers of one module that
    read one input (query/key/value, q/k/v_proj, gate/up_proj: :data:`SHARED_INPUTS`) count once.
    Without ``sample_means`` (what the interference tables, post-hoc OSRM and RegMean's Gram
    matrices read): ``sum h h^T`` and ``sum h`` alone."""
    sb = stats_bytes_per_number(stats_dtype)
    inputs = set()
    for name, d in widths.items():
        parent, _, kind = name.rpartition(".")
        inputs.add((parent, SHARED_INPUTS.get(kind, kind), d))
    return tasks * sum(((2 if sample_means else 1) * d * d + d) * sb for *_, d in inputs)


def eig_work_bytes(widths: dict[str, int], tasks: int) -> int:
    """Bytes of the dense path's work at its widest layer input, beside the statistics: the other
    tasks' moments combined, one layer's symmetric eigendecomposition and its workspace in
    float64 (post-hoc OSRM, the principal angles, the spectra; as the OSRM init's row of
    :func:`memory_plan`): ``(tasks + 3) d^2`` numbers."""
    d = max(widths.values(), default=0)
    return (tasks + 3) * d * d * 8


def regmean_solve_bytes(shapes: dict[str, tuple[int, int]]) -> int:
    """Bytes of RegMean's float64 work at its largest layer (``shapes``: name to ``(d_out,
    d_in)``): the summed Gram matrix, one task's scaled copy and the solver's factors
    (``3 d_in^2``), the weighted deltas, one task's product and the result (``3 d_out d_in``)."""
    return max(3 * d_in * d_in + 3 * d_out * d_in for d_out, d_in in shapes.values()) * 8


def projected_stats_bytes(ranks: dict[str, int], tasks: int, stats_dtype: str = "float64") -> int:
    """Bytes of the projected statistics: ``R x R`` per layer and task (``R``: the adapters'
    ranks at the layer summed)."""
    sb = stats_bytes_per_number(stats_dtype)
    return tasks * sum((r * r + 2) * sb for r in ranks.values())


def check_fits(need: int, what: str, hint: str, *, strict: bool = True, device: str = "cpu") -> str | None:
    """``None`` when ``need`` bytes fit; else the one-line refusal naming ``what``, the bytes
    needed and available and ``hint``: raised (:class:`MemoryPlanError`) when ``strict`` (the
    user asked for what does not fit), returned otherwise (a plan that falls back notes it)."""
    have = available_bytes(device)
    if have is None or need <= have:
        return None
    refusal = f"{what} needs {need / GiB:.1f} GiB, {have / GiB:.1f} GiB available: {hint}"
    if strict:
        raise MemoryPlanError(refusal)
    return refusal


#: Published configs of the shapes in the README's table (hidden, layers, MLP width, heads, KV
#: heads, head width, vocabulary, tied embeddings).
SHAPES = {
    "Llama-3.2-1B": (2048, 16, 8192, 32, 8, 64, 128256, True),
    "Llama-3-8B": (4096, 32, 14336, 32, 8, 128, 128256, False),
    "Qwen2.5-7B": (3584, 28, 18944, 28, 4, 128, 152064, False),
}


def seven_kinds(shape: tuple) -> tuple[dict[str, tuple[int, int]], int]:
    """``{kind: (d_in, d_out)}`` of one block's seven linear layers, and all parameters."""
    h, n, inter, heads, kv, hd, vocab, tied = shape
    kinds = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd),
             "o_proj": (heads * hd, h), "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    params = n * (sum(a * b for a, b in kinds.values()) + 2 * h) + vocab * h * (1 if tied else 2) + h
    return kinds, params


def diagnose_plan(shape: tuple, *, adapters: int = 8, rank: int = 16, tasks: int = 2, weight_bytes: int = 2,
                  seq: int = 128, batches: tuple[int, int] = (16, 32)) -> pd.DataFrame:
    """Memory of ``osrm diagnose`` and ``osrm merge`` on one machine, projected against dense
    statistics, for ``adapters`` LoRAs of ``rank`` on all seven linear kinds of every block.

    Returns a DataFrame ``stage, item, projected, dense`` in bytes (for the merge row,
    ``projected`` is core space and ``dense`` full space). Dense statistics hold ``d^2 + d``
    float64 numbers (``sum h h^T``, ``sum h``: what diagnose collects) per distinct input (q/k/v
    read one, gate/up one) and task; projected ones ``R^2`` per layer and task, ``R = adapters x
    rank``. Each pass reads batches of ``batches`` texts (projected, dense: the collectors'
    defaults) of ``seq`` tokens; a batch's forward activations are an estimate: one block's
    live outputs at the model's precision (four hidden-wide tensors, q/k/v/o, and the MLP's gate,
    up and their product), attention fused. The merge rows: the largest layer's ``adapters``
    deltas in float32 (full space) against its cores (core space).
    """
    from osrm_core.stats.stream import CHUNK_TOKENS

    kinds, params = seven_kinds(shape)
    R = adapters * rank
    widths = {f"{b}.{k}": d_in for b in range(shape[1]) for k, (d_in, _) in kinds.items()}
    lora = adapters * shape[1] * sum(rank * (a + b) for a, b in kinds.values()) * 4
    d_max = max(d for d, _ in kinds.values())
    out_max = max(d for _, d in kinds.values())
    tokens = [b * seq for b in batches]
    per_token = 4 * shape[0] + sum(kinds[k][1] for k in ("q_proj", "k_proj", "v_proj", "o_proj")) \
        + 3 * kinds["up_proj"][1]
    # a chunk of real tokens at the widest input and output, cast to float64 and gathered at the
    # model's precision; the stacked A in float64 and its product with the chunk
    scratch = CHUNK_TOKENS * (d_max + out_max) * (8 + weight_bytes) + R * (d_max + CHUNK_TOKENS) * 8
    rows = [
        ("all", "base weights", params * weight_bytes, params * weight_bytes),
        ("all", "adapters (float32)", lora, lora),
        ("diagnose", "statistics of the tasks", projected_stats_bytes({k: R for k in widths}, tasks),
         dense_stats_bytes(widths, tasks, sample_means=False)),
        ("diagnose", "forward activations of a batch (estimate)", *(t * per_token * weight_bytes for t in tokens)),
        ("diagnose", "per-batch scratch", scratch, 3 * tokens[1] * d_max * 8),
        ("diagnose", "eigendecomposition of the widest layer (float64)", 0, eig_work_bytes(widths, tasks)),
    ]
    df = pd.DataFrame(rows, columns=["stage", "item", "projected", "dense"])
    peak = df[["projected", "dense"]].sum()
    merge = ("merge", "largest layer's work (core / full space)", 3 * R * R * 8,
             adapters * max(a * b for a, b in kinds.values()) * 4)
    return pd.concat([df, pd.DataFrame([("diagnose", "peak", peak["projected"], peak["dense"]), merge],
                                       columns=df.columns)], ignore_index=True)


def scale_table(**options) -> str:
    """The README's table: :func:`diagnose_plan` of :data:`SHAPES` in GiB, as markdown."""
    plans = {name: diagnose_plan(shape, **options) for name, shape in SHAPES.items()}
    first = next(iter(plans.values()))
    head = "| stage | " + " | ".join(f"{n} projected | {n} dense" for n in plans) + " |"
    lines = [head, "|---|" + "---|" * (2 * len(plans))]
    for k, row in first.iterrows():
        label = f"{row.stage}: {row['item']}"
        cells = [f"{p.loc[k, side] / GiB:.2f}" for p in plans.values() for side in ("projected", "dense")]
        if row["item"] == "peak":
            label, cells = f"**{label}**", [f"**{c}**" for c in cells]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def adapter_widths(adapters) -> dict[str, int]:
    """``d_in`` of every layer some adapter covers."""
    from osrm_core.adapters import union_layers

    return {name: d_in for name, (_, d_in) in union_layers(adapters).items()}


def gram_bytes(adapters, tasks: int, stats_dtype: str = "float64") -> int:
    """Bytes of RegMean's inputs and work: each task's Gram matrix (``sum h h^T`` and ``sum h``,
    in ``stats_dtype``) at every layer the merge covers, and the float64 solve of the largest."""
    from osrm_core.adapters import union_layers

    widths = adapter_widths(adapters)
    return (dense_stats_bytes(widths, tasks, stats_dtype, sample_means=False)
            + regmean_solve_bytes(union_layers(adapters)))


def check_grams(adapters, tasks: int, stats_dtype: str = "float64", *, strict: bool = True) -> str | None:
    """Refuse, in one line and before any work, RegMean's Gram matrices when they do not fit
    (``strict``; else return the refusal, ``None`` when they fit)."""
    hint = ("use --stats-dtype float32 (half the memory) or a method without Gram matrices"
            if stats_dtype == "float64" else "use a merge method without Gram matrices")
    return check_fits(gram_bytes(adapters, tasks, stats_dtype), f"RegMean's Gram matrices of {tasks} tasks", hint,
                      strict=strict)


def dense_delta_bytes(adapters) -> int:
    """Bytes of one adapter's dense ``Delta_W`` in float32 over the union of the adapters'
    layers (what a full-space merge method reads per adapter; bias columns not counted)."""
    from osrm_core.adapters import union_layers

    return 4 * sum(d_out * d_in for d_out, d_in in union_layers(adapters).values())


def space_plan(choice: str, adapters, copies: int) -> tuple[str, tuple[str, ...]]:
    """Where a merge search runs: ``full`` (the dense deltas, ``copies`` adapter-sized float32
    copies of them held at once) or ``core`` (the LoRA factors' cores, a few ``R x R`` per
    layer); ``auto``: full when it fits, else core with a note. ``full`` that does not fit is
    refused in one line (:class:`MemoryPlanError`). Returns the space and its notes."""
    if choice not in ("auto", "full", "core"):
        raise OsrmInputError(f"space must be 'auto', 'full' or 'core', got {choice!r}")
    if choice == "core":
        return "core", ()
    refused = check_fits(copies * dense_delta_bytes(adapters), f"the full-space deltas of {len(adapters)} adapters",
                         "use --space core (the merges on the LoRA factors' cores: the same merge for task arithmetic, "
                         "TSV-M, Iso-C, Iso-CTS and CART, another one for TIES and DARE; no RegMean)",
                         strict=choice == "full")
    return ("core", (f"{refused}; searching in core space",)) if refused else ("full", ())


@dataclass(frozen=True)
class StatsPlan:
    """What statistics a workflow on given adapters collects (:func:`stats_plan`).

    Attributes
    ----------
    projected : bool
        The tables come from projected statistics (``r x r`` per adapter pair and layer, see
        :func:`osrm_core.stats.collect_projected_stats`), else from the dense ``d x d`` moments.
    grams : bool
        RegMean's Gram matrices are collected (from dense statistics: the moments themselves).
    notes : tuple of str
        One line per choice the plan made for the user (auto's projected statistics, RegMean
        left out), to print or write beside the results.
    """

    projected: bool
    grams: bool = False
    notes: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        """``projected`` or ``dense``."""
        return "projected" if self.projected else "dense"


def stats_plan(choice: str, adapters, tasks: int, *, stats_dtype: str = "float64", sample_means: bool = True,
               regmean: bool = False) -> StatsPlan:
    """The statistics of ``osrm diagnose`` and ``osrm advise`` for ``tasks`` tasks.

    ``choice`` ``projected``: projected statistics; ``dense``: the ``d x d`` moments in
    ``stats_dtype`` (with ``sample_means`` or without, see :func:`dense_stats_bytes`) and the
    eigendecompositions' work of the widest layer (:func:`eig_work_bytes`), refused in one line
    (:class:`MemoryPlanError`) when they do not fit on the CPU; ``auto``: dense when they fit,
    else projected (with a note). With ``regmean`` (a RegMean merge will run), the dense
    check counts RegMean's float64 solve too, and with projected statistics the Gram matrices
    are collected when :func:`gram_bytes` fits, else RegMean is left out (with a note).
    """
    if choice not in ("auto", "projected", "dense"):
        raise OsrmInputError(f"statistics must be 'auto', 'projected' or 'dense', got {choice!r}")
    from osrm_core.adapters import union_layers

    notes: list[str] = []
    projected = choice == "projected"
    if not projected:
        widths = adapter_widths(adapters)
        need = (dense_stats_bytes(widths, max(tasks, 1), stats_dtype, sample_means=sample_means)
                + eig_work_bytes(widths, max(tasks, 1)))
        refused = check_fits(need + (regmean_solve_bytes(union_layers(adapters)) if regmean else 0),
                             f"dense statistics of {tasks} tasks",
                             "use --stats projected (every table but post-hoc OSRM and the principal angles)",
                             strict=choice == "dense")
        if refused:
            notes.append(f"{refused}; collecting projected statistics")
            projected = True
    grams = regmean
    if regmean and projected:
        refused = check_grams(adapters, max(tasks, 1), stats_dtype, strict=False)
        if refused:
            notes.append(f"regmean left out: {refused}")
            grams = False
    return StatsPlan(projected, grams, tuple(notes))


if __name__ == "__main__":
    print(scale_table())
