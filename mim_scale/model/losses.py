"""Cross-level alignment and the loss weighting (MIM_METHOD.md, 'Losses')."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mim_scale.model.layers import Linear

ALIGN_VARIANTS = ("simsiam", "reference")


class Projector(nn.Module):
    """``g``: Linear -> BatchNorm -> GELU -> Linear -> BatchNorm (no affine), as SimSiam's projector.

    The output BatchNorm centres and scales every dimension over the batch, so ``z`` cannot settle in one
    shared direction (at init without it, every ``z`` pointed the same way and a constant predictor
    removed ~98 % of the loss). x: (P, D) -> (P, D); P >= 2 in training. Under data parallelism the engine
    swaps in a synchronised BatchNorm from outside (:mod:`mim_scale.engine.sync_bn`).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = Linear(dim, dim)
        self.norm1 = _batch_norm(dim)
        self.fc2 = Linear(dim, dim)
        self.norm2 = _batch_norm(dim, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.fc2(F.gelu(self.norm1(self.fc1(x)))))


class Predictor(nn.Module):
    """``h``: Linear -> BatchNorm -> GELU -> Linear, as SimSiam's predictor. x: (P, D) -> (P, D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = Linear(dim, dim)
        self.norm1 = _batch_norm(dim)
        self.fc2 = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.norm1(self.fc1(x))))


def _batch_norm(dim: int, affine: bool = True) -> nn.BatchNorm1d:
    """Batch statistics always, in eval mode too (no running statistics). ``g`` is shared by parents and
    children, which differ in distribution (a token's feature vs a view's mean feature): running statistics
    would mix the two, and in eval mode normalise both with that mix, shifting every ``z`` one way (measured:
    the eval-mode alignment loss rose from 1.9 to 2.8 over 200 steps while the training loss fell). The
    heads are used only in pre-training, where a batch always holds >= 2 pairs."""
    return nn.BatchNorm1d(dim, affine=affine, track_running_stats=False)


class AlignHead(nn.Module):
    """One level boundary's MLPs: projector ``g`` and predictor ``h`` (SimSiam form, with BatchNorm)."""

    def __init__(self, dim: int):
        super().__init__()
        self.projector = Projector(dim)
        self.predictor = Predictor(dim)


# A centred z closer than this to the batch's mean direction carries nothing beyond it (about 0.6 degrees):
# it counts as collapsed rather than being blown up to unit length.
CENTRED_NORM_FLOOR = 1e-2


def alignment_loss(parent: torch.Tensor, child: torch.Tensor, head: AlignHead,
                   variant: str = "simsiam") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negative-cosine alignment of matched (parent, child) feature pairs.

    parent, child: (P, D), row i of ``parent`` is the region that child i came from.
    - ``simsiam`` (spec default): ``z = stop_grad(g(parent))``, ``p = h(g(child))``;
    - ``reference`` (the published code, collapse-prone): ``z = g(stop_grad(parent))``, ``p = h(child)``.
    Returns (loss = mean of 2 - 2 cos(p, z), monitors): the collapse monitors, detached, are
    ``z_std`` the mean over dimensions of the per-dimension std (over the P pairs) of the L2-normalised z
    after removing the batch's mean direction (:func:`centred_z_std`; healthy: near 1/sqrt(D), collapsed: 0;
    a batch whose z share one direction but still differ reads healthy), and ``z_std_raw`` the same without
    the centring (SimSiam's own monitor; reads low whenever the z share a direction).
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
    zd = zn.detach()
    return loss, {"z_std": centred_z_std(zd), "z_std_raw": zd.std(dim=0, correction=0).mean()}


def centred_z_std(zn: torch.Tensor) -> torch.Tensor:
    """zn: (P, D) L2-normalised -> per-dimension std of the rows after removing the mean direction.

    Each row loses its component along the batch's mean direction and is normalised again; a row left
    shorter than :data:`CENTRED_NORM_FLOOR` becomes zero (it was that direction and nothing else). Spread
    rows give about 1/sqrt(D - 1); identical rows give 0.
    """
    mean = zn.mean(dim=0)
    norm = mean.norm()
    u = mean / norm if float(norm) > 0 else mean
    rest = zn - (zn @ u)[:, None] * u[None, :]
    length = rest.norm(dim=-1, keepdim=True)
    rest = torch.where(length > CENTRED_NORM_FLOOR, rest / length.clamp(min=CENTRED_NORM_FLOOR), torch.zeros_like(rest))
    return rest.std(dim=0, correction=0).mean()


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
