"""Training constraints beyond the init: a small registry, each with what it needs.

* ``none`` — A and B train freely (the paper's OSRM is init-only).
* ``freeze_A`` — A stays at its init; only B (and the head) train.
* ``project`` — after every step A's rows are projected back onto the init's subspace; needs
  the subspace (an init of the OSRM family).
* ``penalty`` — adds ``beta * sum_l tr(A_l S_l A_l^T) / mean_eig(S_l)`` to the loss, with
  ``S_l`` the other tasks' second moment at layer ``l``; needs the other tasks' statistics.
* ``penalty_ratio`` — adds ``beta * sum_l tr(A_l S_l A_l^T) / tr(A_l O_l A_l^T)`` (each moment
  divided by its mean eigenvalue), with ``O_l`` the task's own second moment: the others' energy
  per unit of the task's own, the quantity ``osrm_gen`` minimizes at init, kept low during
  training without pulling A towards zero (the ratio does not change with A's scale).
* ``sparse_B`` — LoRI (Zhang et al., COLM 2025, arXiv 2504.07448): A stays at its init and B
  trains densely for a calibration share of the steps (``TrainSettings.calibration``); then a
  fixed mask keeps the ``TrainSettings.b_density`` share of B's entries of largest magnitude,
  chosen globally over all adapted layers (LoRI's default "model-wise" mask), and the others are
  zero from then on (their gradients too, so that clipping sees only what trains). The kept
  entries continue from their calibrated values. LoRI itself calibrates with a whole dense run
  (LoRI-D), takes the mask at 90% sparsity and retrains from scratch with it (LoRI-S); the share
  here is the cheap approximation of that within one run.

:func:`osrm_core.train.finetune` calls :meth:`Constraint.prepare` once, then
:meth:`ActiveConstraint.loss` every step, :meth:`ActiveConstraint.before_step` between the
backward pass and clipping, and :meth:`ActiveConstraint.after_step` after the optimizer's step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from osrm_core.errors import OsrmInputError


@dataclass(frozen=True)
class Constraint:
    """A registered training constraint.

    Attributes
    ----------
    name : str
    description : str
    needs_subspace : bool
        Needs the init's subspace per layer (only inits of the OSRM family have one).
    needs_moments : bool
        Needs the other tasks' second moment per layer.
    needs_own_moment : bool
        Needs the task's own second moment per layer too.
    trains_a : bool
        Whether A is trained at all.
    sparse_b : bool
        B is masked to its largest entries after a calibration share of the steps.
    """

    name: str
    description: str
    needs_subspace: bool = False
    needs_moments: bool = False
    needs_own_moment: bool = False
    trains_a: bool = True
    sparse_b: bool = False

    def prepare(self, layers: dict[str, torch.nn.Module], subspaces=None, moments=None,
                own_moments=None, *, b_density: float = 0.1, mask_step: int = 1) -> ActiveConstraint:
        """The per-layer matrices this constraint uses during training, checked against ``layers``
        (the LoRA layers by name).

        ``subspaces``: dict layer -> tensor (k, d_in); ``moments`` (the other tasks') and
        ``own_moments`` (the task's own): dict layer -> (d_in, d_in). ``b_density`` and
        ``mask_step`` (B's mask is fixed after this many steps, >= 1) serve ``sparse_B``.
        """
        projectors = penalties = own = {}
        if self.needs_subspace:
            projectors = _per_layer(self, layers, subspaces, "subspaces", "subspace", _projector)
        if self.needs_moments:
            penalties = _per_layer(self, layers, moments, "penalty_moments", "second moment", _normalized)
        if self.needs_own_moment:
            own = _per_layer(self, layers, own_moments, "own_moments", "own second moment", _normalized)
        active = ActiveConstraint(self, layers, projectors, penalties, own)
        if self.sparse_b:
            if not 0 < b_density <= 1:
                raise OsrmInputError(f"b_density={b_density!r} is not allowed: must be in (0, 1]")
            if not isinstance(mask_step, int) or mask_step < 1:
                raise OsrmInputError(f"mask_step={mask_step!r} is not allowed: must be an integer >= 1")
            active.b_density, active.mask_step = b_density, mask_step
        return active


def _projector(u: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    q = torch.linalg.qr(u.to(device=a.device, dtype=torch.float64).T).Q
    return q @ q.T


def _normalized(s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    s = s.to(device=a.device, dtype=a.dtype)
    return s / (torch.trace(s) / s.shape[0]).clamp_min(1e-12)


def _per_layer(constraint: Constraint, layers, given, argument: str, what: str, make) -> dict[str, torch.Tensor]:
    if given is None:
        raise OsrmInputError(f"constraint={constraint.name!r} needs {argument} (the {what} per layer)")
    out = {}
    for name, layer in layers.items():
        if name not in given:
            raise OsrmInputError(f"constraint={constraint.name!r}: no {what} for layer {name!r}")
        out[name] = make(given[name], layer.lora_A["default"].weight)
    return out


@dataclass
class ActiveConstraint:
    """A constraint prepared for one model: its loss term and its step after the optimizer."""

    constraint: Constraint
    layers: dict[str, torch.nn.Module]
    projectors: dict[str, torch.Tensor] = field(default_factory=dict)
    penalties: dict[str, torch.Tensor] = field(default_factory=dict)
    own: dict[str, torch.Tensor] = field(default_factory=dict)
    #: ``sparse_B``: the share of B's entries kept, the step after which the mask is fixed, the
    #: steps taken so far and the masks (True: trains), empty until fixed.
    b_density: float | None = None
    mask_step: int = 1
    steps: int = 0
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    def loss(self) -> torch.Tensor | None:
        """The penalty's unweighted ``sum_l tr(A_l S_l A_l^T)`` (divided by ``tr(A_l O_l A_l^T)``
        when the constraint has the task's own moments), or None."""
        if not self.penalties:
            return None
        weights = {n: self.layers[n].lora_A["default"].weight for n in self.penalties}

        def energy(n: str, s: torch.Tensor) -> torch.Tensor:
            return ((weights[n] @ s) * weights[n]).sum()

        if self.own:
            return sum(energy(n, s) / energy(n, self.own[n]).clamp_min(1e-12) for n, s in self.penalties.items())
        return sum(energy(n, s) for n, s in self.penalties.items())

    @torch.no_grad()
    def before_step(self) -> None:
        """Zero the gradients of B's masked entries (once the mask is fixed)."""
        for name, mask in self.masks.items():
            b = self.layers[name].lora_B["default"].weight
            if b.grad is not None:
                b.grad.mul_(mask)

    @torch.no_grad()
    def after_step(self) -> None:
        for name, p in self.projectors.items():
            a = self.layers[name].lora_A["default"].weight
            a.copy_((a.double() @ p).to(a.dtype))
        self.steps += 1
        if self.b_density is None:
            return
        if not self.masks and self.steps >= self.mask_step:
            self.masks = b_masks({n: layer.lora_B["default"].weight for n, layer in self.layers.items()},
                                 self.b_density)
        for name, mask in self.masks.items():  # the optimizer's momentum would move masked entries
            self.layers[name].lora_B["default"].weight.mul_(mask)


def b_masks(weights: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """Masks (True: kept) of the ``round(density * n)`` entries of largest magnitude among all
    ``n`` entries of ``weights`` together (at least one; ties broken by position), by name."""
    flat = torch.cat([w.detach().abs().flatten().float().cpu() for w in weights.values()])
    keep = min(len(flat), max(1, round(density * len(flat))))
    chosen = torch.zeros(len(flat), dtype=torch.bool)
    chosen[torch.topk(flat, keep, sorted=False).indices] = True
    masks, start = {}, 0
    for name, w in weights.items():
        masks[name] = chosen[start : start + w.numel()].view(w.shape).to(device=w.device, dtype=w.dtype)
        start += w.numel()
    return masks


CONSTRAINTS: dict[str, Constraint] = {
    c.name: c
    for c in (
        Constraint("none", "A and B train freely"),
        Constraint("freeze_A", "A stays at its init", trains_a=False),
        Constraint("project", "A is projected back onto the init's subspace after every step", needs_subspace=True),
        Constraint("penalty", "beta * tr(A S_rest A^T) added to the loss", needs_moments=True),
        Constraint("penalty_ratio", "beta * tr(A S_rest A^T) / tr(A S_own A^T) added to the loss",
                   needs_moments=True, needs_own_moment=True),
        Constraint("sparse_B", "A stays at its init; after a calibration share of the steps only the largest "
                   "entries of B (b_density of them, over all layers) train, the others stay zero (LoRI)",
                   trains_a=False, sparse_b=True),
    )
}


def get_constraint(name: str) -> Constraint:
    """The constraint registered as ``name``; ValueError listing the known ones otherwise."""
    if not isinstance(name, str) or name not in CONSTRAINTS:
        raise OsrmInputError(f"unknown constraint {name!r}; allowed: {', '.join(CONSTRAINTS)}")
    return CONSTRAINTS[name]


def check_constraint(constraint: str, inits: list[str], field: str = "train.constraint") -> None:
    """Refuse a constraint that needs what one of ``inits`` cannot give (one-line ValueError
    naming ``field``, where the constraint was set)."""
    from osrm_core.inits import INITS, OSRM_METHODS

    needs = get_constraint(constraint)
    for init in inits:
        if needs.needs_subspace and not INITS[init].needs_stats:
            raise OsrmInputError(
                f"{field} {constraint!r} keeps A in the OSRM subspace, which init {init!r} has not; "
                f"use it with {', '.join(OSRM_METHODS)} only"
            )
        if needs.sparse_b and INITS[init].moves_base:
            raise OsrmInputError(
                f"{field} {constraint!r} keeps B sparse, but init {init!r} moves the base weights: its saved "
                "adapter carries the initial B too and would not be sparse; use another init"
            )
