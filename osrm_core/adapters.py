"""LoRA adapters as plain tensors: read from a PeftModel or a PEFT adapter folder, write back.

Everything here uses the ``nn.Linear`` convention: ``A`` is (r, d_in), ``B`` is (d_out, r) and
``Delta_W = scale * B @ A`` is (d_out, d_in), also for GPT-2's transposed ``Conv1D``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from osrm_core.adapter_config import check_adapter_config, lora_scale, pattern_value, targets_layer
from osrm_core.atomic import atomic_path, write_json
from osrm_core.errors import AdapterError, OsrmInputError

PEFT_PREFIX = "base_model.model."



@dataclass
class LoraWeights:
    """One adapted layer of one adapter.

    Attributes
    ----------
    A : tensor of shape (r, d_in)
    B : tensor of shape (d_out, r)
    scale : float
        ``lora_alpha / r`` (or ``/ sqrt(r)`` for rsLoRA).
    bias : tensor of shape (d_out,) or None
        ``lora_B``'s bias of a ``lora_bias`` adapter; the layer's bias moves by ``scale * bias``.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def delta(self) -> torch.Tensor:
        """``Delta_W = scale * B @ A``, shape (d_out, d_in)."""
        return self.scale * (self.B @ self.A)

    @property
    def bias_delta(self) -> torch.Tensor | None:
        """The shift of the layer's bias, ``scale * bias``, shape (d_out,), or None."""
        return None if self.bias is None else self.scale * self.bias


@dataclass
class Adapter:
    """A LoRA adapter: its layers, its head weights and its peft config (as a dict).

    ``layers`` is keyed by the base model's module names (no ``base_model.model.`` prefix);
    ``head`` maps head parameter names (``classifier.weight``) to tensors.
    """

    layers: dict[str, LoraWeights]
    head: dict[str, torch.Tensor]
    config: dict
    #: Where it was read from (a path, or ``hf:OWNER/REPO@REVISION``) and the SHA-256 of its
    #: weights file; empty for adapters made in memory.
    source: str = ""
    sha256: str = ""

    def deltas(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """``Delta_W`` per layer, shape (d_out, d_in)."""
        return {n: lw.delta.to(dtype) for n, lw in self.layers.items()}

    @property
    def task_type(self) -> str | None:
        """peft's ``task_type`` (``SEQ_CLS``, ``CAUSAL_LM``, ...), or None."""
        return self.config.get("task_type")


def union_layers(adapters: dict[str, Adapter]) -> dict[str, tuple[int, int]]:
    """Every layer that some adapter adapts, sorted, with its shape ``(d_out, d_in)``.

    Adapters may cover different layers (one on query/key/value, another on query/value);
    a layer's shape must agree between the adapters that have it.
    """
    shapes: dict[str, tuple[int, int]] = {}
    owner: dict[str, str] = {}
    for name, adapter in adapters.items():
        for layer, lw in adapter.layers.items():
            shape = (lw.B.shape[0], lw.A.shape[1])
            if layer in shapes and shapes[layer] != shape:
                raise OsrmInputError(
                    f"size mismatch for layer {layer!r}: adapter {name!r} is {shape[0]}x{shape[1]}, adapter "
                    f"{owner[layer]!r} is {shapes[layer][0]}x{shapes[layer][1]} (adapters of other base models?)"
                )
            shapes.setdefault(layer, shape)
            owner.setdefault(layer, name)
    return dict(sorted(shapes.items()))


def aligned_deltas(adapters: dict[str, Adapter]) -> list[dict[str, torch.Tensor]]:
    """Each adapter's ``Delta_W`` over the union of layers, zero where it has no weights.

    At a layer where some adapter has a ``lora_bias``, the bias shift is a last column:
    the delta is ``[Delta_W | scale * bias]`` of shape (d_out, d_in + 1), the weight of the
    input ``[h; 1]``, so every merge method treats the bias as one more input (see
    :func:`split_bias`). Returns a list in the adapters' order of dicts layer -> tensor.
    """
    return map_aligned(adapters, _delta_with_bias)


def map_aligned(adapters: dict[str, Adapter], layer_fn: Callable) -> list[dict]:
    """``layer_fn(lw, d_out, d_in, bias_column)`` for every adapter and every layer of the union of
    their layers (``lw`` None where the adapter has none; ``bias_column``: some adapter has a
    bias there); a list in the adapters' order of dicts layer -> value."""
    shapes = union_layers(adapters)
    with_bias = {n for a in adapters.values() for n, lw in a.layers.items() if lw.bias is not None}
    return [{n: layer_fn(a.layers.get(n), d_out, d_in, n in with_bias) for n, (d_out, d_in) in shapes.items()}
            for a in adapters.values()]


def _delta_with_bias(lw: LoraWeights | None, d_out: int, d_in: int, bias_column: bool) -> torch.Tensor:
    delta = torch.zeros(d_out, d_in) if lw is None else lw.delta.float()
    if bias_column:
        shift = None if lw is None else lw.bias_delta
        column = torch.zeros(d_out) if shift is None else shift.float()
        delta = torch.cat([delta, column[:, None]], 1)
    return delta


def split_bias(delta: torch.Tensor, d_in: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(Delta_W, bias shift)`` of a delta from :func:`aligned_deltas` (shift None without one)."""
    if delta.shape[1] == d_in + 1:
        return delta[:, :d_in], delta[:, d_in]
    return delta, None


def lora_from_model(peft_model, adapter_name: str = "default") -> Adapter:
    """The LoRA weights (detached copies) and head of an in-memory peft model."""
    base = peft_model.get_base_model()
    layers: dict[str, LoraWeights] = {}
    for name, module in base.named_modules():
        if hasattr(module, "lora_A") and adapter_name in getattr(module, "lora_A", {}):
            bias = module.lora_B[adapter_name].bias
            layers[name] = LoraWeights(
                module.lora_A[adapter_name].weight.detach().clone(),
                module.lora_B[adapter_name].weight.detach().clone(),
                float(module.scaling[adapter_name]),
                None if bias is None else bias.detach().clone(),
            )
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    head = {
        k[len(PEFT_PREFIX) :]: v.detach().clone()
        for k, v in state.items()
        if "lora_" not in k and k.startswith(PEFT_PREFIX)
    }
    return Adapter(layers, head, peft_model.peft_config[adapter_name].to_dict())


def read_adapter_dir(path: str | Path, *, allow_pickle: bool = False, where: str | None = None) -> Adapter:
    """Read ``adapter_config.json`` and ``adapter_model.safetensors`` from a PEFT adapter folder.

    A pickled ``adapter_model.bin`` is refused unless ``allow_pickle`` (then loaded with
    ``torch.load(weights_only=True)``). The config is checked (:func:`check_adapter_config`),
    every layer's rank must match it, and non-finite weights are refused. ``where`` names the
    adapter in messages (default: the folder's name). Uploads go through :func:`load_adapter`.
    """
    path = Path(path)
    where = where or path.name
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"{where}: no adapter_config.json; is this a PEFT adapter folder?")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterError(f"{where}: adapter_config.json is not valid JSON ({err})") from None
    except RecursionError:
        raise AdapterError(f"{where}: adapter_config.json is nested too deeply") from None
    check_adapter_config(config, where)
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError, ValueError, TypeError) as err:
            raise AdapterError(f"{where}: adapter_model.safetensors is damaged ({err})") from None
    elif (path / "adapter_model.bin").is_file():
        if not allow_pickle:
            raise AdapterError(
                f"{where}: adapter_model.bin is a pickle, which can run code when loaded; "
                "convert it with safetensors (save_pretrained(..., safe_serialization=True)) "
                "or opt in to loading it with allow_pickle"
            )
        try:
            state = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a bad pickle
            raise AdapterError(f"{where}: adapter_model.bin cannot be loaded safely ({err})") from None
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise AdapterError(f"{where}: adapter_model.bin does not hold a dict of named tensors")
    else:
        raise AdapterError(f"{where}: no adapter_model.safetensors")
    adapter = adapter_from_state(state, config, where=where)
    weights_file = weights if weights.is_file() else path / "adapter_model.bin"
    adapter.sha256 = hashlib.sha256(weights_file.read_bytes()).hexdigest()
    return adapter


def adapter_from_state(state: dict[str, torch.Tensor], config: dict, where: str = "adapter") -> Adapter:
    """Assemble an :class:`Adapter` from a PEFT state dict and its config dict."""
    a_parts: dict[str, torch.Tensor] = {}
    b_parts: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if not torch.is_floating_point(tensor):
            raise AdapterError(f"{where}: tensor {key!r} is not floating point ({tensor.dtype})")
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"{where}: tensor {key!r} has NaN or Inf values")
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        layer, _, kind = name.rpartition(".")
        if layer.endswith(".lora_A") and kind == "weight":
            a_parts[layer[: -len(".lora_A")]] = tensor
        elif layer.endswith(".lora_B") and kind == "weight":
            b_parts[layer[: -len(".lora_B")]] = tensor
        elif layer.endswith(".lora_B") and kind == "bias":
            biases[layer[: -len(".lora_B")]] = tensor
        elif "lora_" in name:
            raise AdapterError(
                f"{where}: tensor {key!r} is not supported: only LoRA on linear layers "
                "(lora_A/lora_B weights, lora_B bias) can be read"
            )
        else:  # modules_to_save: the head, or any other module trained in full
            head[name.replace(".modules_to_save.default", "").replace(".modules_to_save", "")] = tensor
    if not a_parts:
        raise AdapterError(f"{where}: no LoRA weights (lora_A/lora_B) found")
    layers: dict[str, LoraWeights] = {}
    only_b = sorted(set(b_parts) - set(a_parts))
    if only_b:
        raise AdapterError(f"{where}: layer {only_b[0]!r} has lora_B but no lora_A")
    for name, a in a_parts.items():
        if name not in b_parts:
            raise AdapterError(f"{where}: layer {name!r} has lora_A but no lora_B")
        b = b_parts[name]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{where}: size mismatch for layer {name!r}: lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}"
            )
        if "r" in config:
            expected = pattern_value(config.get("rank_pattern"), name, config["r"])
            if a.shape[0] != expected:
                raise AdapterError(
                    f"{where}: layer {name!r} has rank {a.shape[0]} but adapter_config.json says r={expected}"
                )
        if "target_modules" in config and not targets_layer(config["target_modules"], name):
            raise AdapterError(
                f"{where}: layer {name!r} is not in adapter_config.json's target_modules {config['target_modules']!r}"
            )
        bias = biases.pop(name, None)
        if bias is not None and tuple(bias.shape) != (b.shape[0],):
            raise AdapterError(
                f"{where}: size mismatch for layer {name!r}: lora_B bias {tuple(bias.shape)}, lora_B {tuple(b.shape)}"
            )
        layers[name] = LoraWeights(a, b, lora_scale(config, name, a.shape[0]), bias)
    if biases:
        raise AdapterError(f"{where}: layer {next(iter(biases))!r} has a lora_B bias but no lora_B weight")
    return Adapter(layers, head, config)


def check_against_model(adapter: Adapter, model: nn.Module, where: str = "adapter") -> None:
    """Every adapted layer must be a linear layer of ``model`` with the adapter's shapes, and
    every other tensor (the head) a parameter of ``model`` of the same trailing shape."""
    from osrm_core.models import _is_conv1d, weight_as_linear

    base = adapter.config.get("base_model_name_or_path")
    hint = f"the adapter names base model {base!r}" if base else "an adapter for another base model?"
    for name, lw in adapter.layers.items():
        try:
            module = model.get_submodule(name) if name else None
        except AttributeError:
            module = None
        if module is None:
            raise AdapterError(f"{where}: layer {name!r} does not exist in the base model ({hint})")
        module = getattr(module, "base_layer", module)
        if not (isinstance(module, nn.Linear) or _is_conv1d(module)):
            raise AdapterError(
                f"{where}: layer {name!r} of the base model is a {type(module).__name__}, not a linear layer"
            )
        d_out, d_in = weight_as_linear(module).shape
        if lw.A.shape[1] != d_in or lw.B.shape[0] != d_out:
            raise AdapterError(
                f"{where}: size mismatch for layer {name!r}: adapter is {lw.B.shape[0]}x{lw.A.shape[1]},"
                f" the base model's layer is {d_out}x{d_in} ({hint})"
            )
        if lw.bias is not None and getattr(module, "bias", None) is None:
            raise AdapterError(
                f"{where}: layer {name!r} has a lora_B bias (lora_bias: true) but the base model's layer "
                "has no bias; peft refuses this too"
            )
    params = dict(model.named_parameters())
    for key, tensor in adapter.head.items():
        if key not in params:
            raise AdapterError(
                f"{where}: tensor {key!r} is neither a LoRA weight nor a parameter of the base model"
            )
        if params[key].ndim != tensor.ndim or params[key].shape[1:] != tensor.shape[1:]:
            raise AdapterError(
                f"{where}: size mismatch for head {key!r}: {tuple(tensor.shape)} vs "
                f"{tuple(params[key].shape)} in the base model"
            )


def num_labels_of(adapter: Adapter) -> int | None:
    """Number of classes of the adapter's head (from the last head weight), if it has one."""
    for key in ("classifier.weight", "score.weight", "classifier.out_proj.weight"):
        if key in adapter.head:
            return int(adapter.head[key].shape[0])
    return None


def write_adapter(
    path: str | Path,
    layers: dict[str, LoraWeights],
    config: dict,
    head: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a PEFT LoRA adapter folder that plain ``PeftModel.from_pretrained`` loads.

    All layers must share one rank; ``config`` is a peft LoraConfig dict (``r`` and
    ``lora_alpha`` are set from the layers: alpha so that ``alpha / r`` is the layers' scale).
    """
    from safetensors.torch import save_file

    ranks = {lw.rank for lw in layers.values()}
    scales = {round(lw.scale, 12) for lw in layers.values()}
    if len(ranks) != 1 or len(scales) != 1:
        raise OsrmInputError("write_adapter needs one rank and one scale for all layers")
    rank, scale = ranks.pop(), scales.pop()
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AdapterError(f"cannot write an adapter to {str(path)!r}: it is an existing file, not a folder")
    path.mkdir(parents=True, exist_ok=True)
    state = {}
    lora_bias = any(lw.bias is not None for lw in layers.values())
    for name, lw in layers.items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = lw.A.detach().float().cpu().contiguous()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = lw.B.detach().float().cpu().contiguous()
        if lora_bias:  # peft's lora_bias is one switch for all layers
            bias = lw.B.new_zeros(lw.B.shape[0]) if lw.bias is None else lw.bias
            state[f"{PEFT_PREFIX}{name}.lora_B.bias"] = bias.detach().float().cpu().contiguous()
    for key, tensor in (head or {}).items():
        state[f"{PEFT_PREFIX}{key}"] = tensor.detach().float().cpu().contiguous()
    config = dict(config)
    config.update(
        r=rank,
        lora_alpha=scale * rank,
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        target_modules=sorted(layers),
        init_lora_weights=True,
        lora_bias=lora_bias,
    )
    config.pop("eva_config", None)
    with atomic_path(path / "adapter_model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json(path / "adapter_config.json", config)
    return path


# --------------------------------------------------------------------------- safe loading

#: ``hf:OWNER/REPO[@REVISION]``: an adapter on the Hugging Face Hub.
HUB_SPEC = re.compile(r"hf:(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<revision>[\w./-]{1,200}))?")


def download_hub_adapter(spec: str) -> Path:
    """The local folder of a Hub adapter ``hf:OWNER/REPO[@REVISION]``, fetched through
    ``huggingface_hub`` (its cache; ``HF_HUB_OFFLINE=1`` uses the cache alone). Only
    ``adapter_config.json`` and ``*.safetensors`` are fetched: never a pickle.

    Raises
    ------
    AdapterError
        For a malformed spec, or when the adapter cannot be fetched (offline, unknown repo):
        one line.
    """
    match = HUB_SPEC.fullmatch(spec)
    if match is None:
        raise AdapterError(f"adapter {spec!r}: a Hub adapter is hf:OWNER/REPO or hf:OWNER/REPO@REVISION")
    from huggingface_hub import snapshot_download

    repo, revision = match["repo"], match["revision"]
    try:
        folder = snapshot_download(repo, revision=revision, allow_patterns=["adapter_config.json", "*.safetensors"])
    except Exception as err:  # offline, unknown repo or revision, network: the hub's message says which
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise AdapterError(
            f"adapter {spec!r} cannot be fetched from the Hugging Face Hub ({type(err).__name__}: {first}); "
            "without network, download it where there is one or give a local folder"
        ) from None
    return Path(folder)


def load_adapter(
    path: str | Path,
    base_model: nn.Module | None = None,
    *,
    allow_pickle: bool = False,
    name: str | None = None,
) -> Adapter:
    """Load a PEFT LoRA adapter from a folder, a zip or the Hub, safely; check it against ``base_model``.

    The one entry point for adapters from elsewhere (the command line and the app's uploads).
    ``path`` is a folder, a zip, or ``hf:OWNER/REPO[@REVISION]`` (:func:`download_hub_adapter`).
    Safetensors only unless ``allow_pickle`` (then ``torch.load(weights_only=True)``); a zip is
    checked before extraction (:func:`osrm_core.archive.safe_extract_zip`) and extracted into a
    private temporary folder that is removed afterwards; ``adapter_config.json`` is validated,
    NaN/Inf weights are refused, and with ``base_model`` every tensor is checked against its
    layers. ``name`` is how messages call the adapter (default: the file's name).

    Raises
    ------
    AdapterError
        ``"NAME: reason"``, one line.
    """
    import tempfile
    import zipfile

    if isinstance(path, str) and path.startswith("hf:"):
        where = name or path
        adapter = read_adapter_dir(download_hub_adapter(path), where=where)
        adapter.source = path
    else:
        path = Path(path)
        where = name or path.name
        if not path.exists():
            raise AdapterError(f"adapter {str(path)!r} does not exist")
        if path.is_dir():
            adapter = read_adapter_dir(path, allow_pickle=allow_pickle, where=where)
        elif path.suffix.lower() == ".zip" or zipfile.is_zipfile(path):
            from osrm_core.archive import ArchiveError, find_root_with, safe_extract_zip

            with tempfile.TemporaryDirectory(prefix="osrm-adapter-") as tmp:
                try:
                    root = find_root_with(safe_extract_zip(path, tmp), "adapter_config.json")
                except ArchiveError as err:
                    raise AdapterError(f"{where}: {err}") from None
                adapter = read_adapter_dir(root, allow_pickle=allow_pickle, where=where)
        else:
            raise AdapterError(f"{where}: must be a PEFT adapter folder or a .zip of one")
        adapter.source = str(path)
    if base_model is not None:
        check_against_model(adapter, base_model, where=where)
    return adapter
