"""peft's own initializations, the baselines: ``standard`` (Kaiming A, B = 0), EVA (A from the
SVD of the task's own activations; needs a few batches of its data) and PiSSA (A and B from the
principal singular vectors of W0, which it removes from the base weights).

References
----------
Hu et al., "LoRA", ICLR 2022; Paischer et al., "One Initialization to Rule them All (EVA)",
arXiv:2410.07170; Meng et al., "PiSSA", NeurIPS 2024.
"""

from __future__ import annotations

from .base import InitMethod

STANDARD = InitMethod("standard", "peft's default: Kaiming-uniform A, B = 0", "#636EFA")
EVA = InitMethod("eva", "EVA: A from the SVD of the task's own activations (peft)", "#00CC96",
                 peft_init="eva", needs_data=True)
PISSA = InitMethod("pissa", "PiSSA: principal singular directions of W0 (peft)", "#19D3F3",
                   peft_init="pissa", moves_base=True)
