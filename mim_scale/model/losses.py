"""Cross-level alignment and the loss weighting (MIM_METHOD.md, 'Losses')."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mim_scale.model.layers import Mlp

ALIGN_VARIANTS = ("simsiam", "reference")


class AlignHead(nn.Module):
    """One level boundary's MLPs: projector ``g`` and predictor ``h`` (dim -> dim -> dim, GELU)."""

    def __init__(self, dim: int):
        super().__init__()
        self.projector = Mlp(dim, dim)
        self.predictor = Mlp(dim, dim)


def alignment_loss(parent: torch.Tensor, child: torch.Tensor, head: AlignHead,
                   variant: str = "simsiam") -> tuple[torch.Tensor, torch.Tensor]:
    """Negative-cosine alignment of matched (parent, child) feature pairs.

    parent, child: (P, D), row i of ``parent`` is the region that child i came from.
    - ``simsiam`` (spec default): ``z = stop_grad(g(parent))``, ``p = h(g(child))``;
    - ``reference`` (the published code, collapse-prone): ``z = g(stop_grad(parent))``, ``p = h(child)``.
    Returns (loss = mean of 2 - 2 cos(p, z), z_std): z_std is the collapse monitor, the mean over
    dimensions of the per-dimension std (over the P pairs) of L2-normalised z, detached; healthy
    features give about 1/sqrt(D), a collapsed projector gives 0.
    """
    if parent.shape != child.shape or parent.dim() != 2:
        raise ValueError(f"parent and child must both be (P, D), got {tuple(parent.shape)} and {tuple(child.shape)}")
    if variant == "simsiam":
        z = head.projector(parent).detach()
        p = head.predictor(head.projector(child))
    elif variant == "reference":
        z = head.projector(parent.detach())
        p = head.predictor(child)
    else:
        raise ValueError(f"unknown alignment variant {variant!r} (valid: {', '.join(ALIGN_VARIANTS)})")
    dtype = torch.promote_types(z.dtype, torch.float32)  # at least fp32 under bf16
    zn = F.normalize(z.to(dtype), dim=-1)
    pn = F.normalize(p.to(dtype), dim=-1)
    loss = (2.0 - 2.0 * (pn * zn).sum(dim=-1)).mean()
    z_std = zn.detach().std(dim=0, correction=0).mean()
    return loss, z_std


def rec_weights_at(weights: tuple[float, ...], schedule: str, progress: float) -> tuple[float, float, float]:
    """Per-level reconstruction weights at ``progress`` in [0, 1] of training.

    ``constant``: the weights as given. ``sincos`` (coarse to fine): level 1 is scaled by
    ``cos(pi/2 * progress)`` and level 3 by ``sin(pi/2 * progress)``; level 2 stays fixed.
    """
    w1, w2, w3 = (float(w) for w in weights)
    if schedule == "constant":
        return w1, w2, w3
    if schedule != "sincos":
        raise ValueError(f"unknown loss schedule {schedule!r} (valid: constant, sincos)")
    t = min(max(float(progress), 0.0), 1.0)
    return w1 * math.cos(0.5 * math.pi * t), w2, w3 * math.sin(0.5 * math.pi * t)
