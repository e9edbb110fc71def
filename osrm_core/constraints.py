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

:func:`osrm_core.train.finetune` calls :meth:`Constraint.prepare` once, then
:meth:`ActiveConstraint.loss` every step and :meth:`ActiveConstraint.after_step` after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
    """

    name: str
    description: str
    needs_subspace: bool = False
    needs_moments: bool = False
    needs_own_moment: bool = False
    trains_a: bool = True

    def prepare(self, layers: dict[str, torch.nn.Module], subspaces=None, moments=None,
                own_moments=None) -> ActiveConstraint:
        """The per-layer matrices this constraint uses during training, checked against ``layers``
        (the LoRA layers by name).

        ``subspaces``: dict layer -> tensor (k, d_in); ``moments`` (the other tasks') and
        ``own_moments`` (the task's own): dict layer -> (d_in, d_in).
        """
        projectors = penalties = own = {}
        if self.needs_subspace:
            projectors = _per_layer(self, layers, subspaces, "subspaces", "subspace", _projector)
        if self.needs_moments:
            penalties = _per_layer(self, layers, moments, "penalty_moments", "second moment", _normalized)
        if self.needs_own_moment:
            own = _per_layer(self, layers, own_moments, "own_moments", "own second moment", _normalized)
        return ActiveConstraint(self, layers, projectors, penalties, own)


def _projector(u: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    q = torch.linalg.qr(u.to(device=a.device, dtype=torch.float64).T).Q
    return q @ q.T


def _normalized(s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    s = s.to(device=a.device, dtype=a.dtype)
    return s / (torch.trace(s) / s.shape[0]).clamp_min(1e-12)


def _per_layer(constraint: Constraint, layers, given, argument: str, what: str, make) -> dict[str, torch.Tensor]:
    if given is None:
        raise ValueError(f"constraint={constraint.name!r} needs {argument} (the {what} per layer)")
    out = {}
    for name, layer in layers.items():
        if name not in given:
            raise ValueError(f"constraint={constraint.name!r}: no {what} for layer {name!r}")
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
    def after_step(self) -> None:
        for name, p in self.projectors.items():
            a = self.layers[name].lora_A["default"].weight
            a.copy_((a.double() @ p).to(a.dtype))


CONSTRAINTS: dict[str, Constraint] = {
    c.name: c
    for c in (
        Constraint("none", "A and B train freely"),
        Constraint("freeze_A", "A stays at its init", trains_a=False),
        Constraint("project", "A is projected back onto the init's subspace after every step", needs_subspace=True),
        Constraint("penalty", "beta * tr(A S_rest A^T) added to the loss", needs_moments=True),
        Constraint("penalty_ratio", "beta * tr(A S_rest A^T) / tr(A S_own A^T) added to the loss",
                   needs_moments=True, needs_own_moment=True),
    )
}


def get_constraint(name: str) -> Constraint:
    """The constraint registered as ``name``; ValueError listing the known ones otherwise."""
    if not isinstance(name, str) or name not in CONSTRAINTS:
        raise ValueError(f"unknown constraint {name!r}; allowed: {', '.join(CONSTRAINTS)}")
    return CONSTRAINTS[name]


def check_constraint(constraint: str, inits: list[str], field: str = "train.constraint") -> None:
    """Refuse a constraint that needs what one of ``inits`` cannot give (one-line ValueError
    naming ``field``, where the constraint was set)."""
    from osrm_core.inits import INITS, OSRM_METHODS

    needs = get_constraint(constraint)
    for init in inits:
        if needs.needs_subspace and not INITS[init].needs_stats:
            raise ValueError(
                f"{field} {constraint!r} keeps A in the OSRM subspace, which init {init!r} has not; "
                f"use it with {', '.join(OSRM_METHODS)} only"
            )
