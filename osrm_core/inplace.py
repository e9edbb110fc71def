"""Deltas applied to a model's adapted layers in place, and taken back.

A delta given as LoRA factors (:class:`osrm_core.merge.LoraFactors`: an adapter alone, a
core-space merge) is applied as a forward hook that adds ``lam * B (A x)`` to the layer's output:
no weight changes, no copy of the base weights, a few ``r x d`` products per token. A dense
delta (a full-space merge) is written into the weight, ``W0 + lam * Delta``, the layer's base
weight (and bias) saved first and put back when the layer is next given factors or nothing. So a
sweep or search over core-space merges holds the model once; over full-space merges, once more
for the layers they change (as a merged model would).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from osrm_core.adapters import split_bias
from osrm_core.models import weight_as_linear


class AppliedDeltas:
    """What is applied to each adapted layer of one model (share one per model: the engines
    scoring two sets of texts on one model, see :class:`osrm_core.evaluate.SweepEngine`).

    Parameters
    ----------
    layers : dict of layer name to module
        The adapted layers (``nn.Linear`` or GPT-2's ``Conv1D``).
    """

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.layers = layers
        self.saved: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # base weight and bias, while changed
        self.hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}

    @torch.no_grad()
    def set(self, deltas: dict | None, lam: float = 1.0) -> None:
        """Apply ``lam * deltas[name]`` at every layer (``None``: the base model everywhere); a
        delta is a (d_out, d_in) tensor or LoraFactors, either with a bias column
        (:func:`osrm_core.adapters.split_bias`) that moves the bias too."""
        from osrm_core.merge import LoraFactors

        for name, module in self.layers.items():
            delta = None if deltas is None else deltas[name]
            hook = self.hooks.pop(name, None)
            if hook is not None:
                hook.remove()
            if delta is None or isinstance(delta, LoraFactors):
                self._put_back(name, module)
                if delta is not None:
                    self.hooks[name] = module.register_forward_hook(_low_rank_hook(module, delta, lam))
                continue
            w = weight_as_linear(module)
            bias = getattr(module, "bias", None)
            if name not in self.saved:
                self.saved[name] = (w.detach().clone(), None if bias is None else bias.detach().clone())
            w0, b0 = self.saved[name]
            delta, shift = split_bias(delta, w.shape[1])
            w.copy_(w0 + lam * delta.to(w.device, w.dtype))
            if b0 is not None:
                bias.copy_(b0 if shift is None else b0 + lam * shift.to(w.device, w.dtype))

    def _put_back(self, name: str, module: nn.Module) -> None:
        if name in self.saved:
            w0, b0 = self.saved.pop(name)
            weight_as_linear(module).copy_(w0)
            if b0 is not None:
                module.bias.copy_(b0)


def _low_rank_hook(module: nn.Module, factors, lam: float):
    """A forward hook adding ``lam * B (A x + a)`` to the output (``a``: A's bias column, the
    bias shift's input ``1``), computed in the factors' dtype."""
    weight = weight_as_linear(module)
    d_in = weight.shape[1]
    b = (lam * factors.B).to(weight.device)
    a = factors.A.to(weight.device)
    a, shift = (a[:, :d_in], a[:, d_in]) if a.shape[1] == d_in + 1 else (a, None)

    def hook(_module, inputs, output):
        x = inputs[0]
        return output + F.linear(F.linear(x.to(a.dtype), a, shift), b).to(output.dtype)

    return hook
