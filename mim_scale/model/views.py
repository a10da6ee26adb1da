"""The masked views of one MiM step, built on the crops' device (MIM_METHOD.md, 'One training sample').

From crops (B, C, S, S, S), S = 2V, with grid g = V / p tokens per side and L = g^3:

- level 1: trilinear downsample to V^3; the g^3 grid splits into 8 octants (each a (g/2)^3 block
  of tokens, octant index ``4*od + 2*oh + ow``); ``round(8 * level1_ratio)`` octants are masked whole.
  With ``levels == 1`` (plain MAE) level 1 is masked at random instead, keeping
  ``floor(L * (1 - level1_ratio))`` tokens.
- level 2: each masked level-1 octant ``(od, oh, ow)`` is the full-resolution V^3 block of the crop
  at voxel origin ``(od*V, oh*V, ow*V)``; masked at random keeping ``floor(L * (1 - level2_ratio))``.
- level 3: per level-2 view, ``level3_picks`` of its masked tokens are drawn at random; each p^3
  patch is upsampled (trilinear, ``align_corners=False``) to V^3 and masked at random keeping
  ``floor(L * (1 - level3_ratio))``.

Every random draw uses ``generator`` (on the crops' device) when given, torch's global RNG otherwise.
Masks follow the ops convention: (N, L), 1 = masked. ``ids_keep`` lists visible tokens ascending.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mim_scale import ops
from mim_scale.config import MaskingConfig, ModelConfig


@dataclass
class LevelViews:
    """The masked views of one level, for a batch of B crops.

    x: (N, C, V, V, V) the view volumes; mask: (N, L) float, 1 = masked; ids_keep: (N, K) int64;
    crop_index: (N,) which crop each view came from.
    Level 2: ``octant`` (N,) the level-1 octant it is; ``parent`` (N,) index of its level-1 view.
    Level 3: ``token`` (N,) the level-2 token it was cut from; ``parent`` (N,) its level-2 view.
    """

    level: int
    x: torch.Tensor
    mask: torch.Tensor
    ids_keep: torch.Tensor
    crop_index: torch.Tensor
    parent: torch.Tensor | None = None
    octant: torch.Tensor | None = None
    token: torch.Tensor | None = None

    @property
    def num_views(self) -> int:
        return self.x.shape[0]

    @property
    def num_keep(self) -> int:
        return self.ids_keep.shape[1]


def kept_count(num_tokens: int, ratio: float) -> int:
    """Visible tokens of a randomly masked view: floor(L * (1 - ratio)) (the reference's rounding)."""
    return int(math.floor(num_tokens * (1.0 - ratio)))


def octants_masked(ratio: float) -> int:
    return int(round(8 * ratio))


def octant_membership(grid: int, device=None) -> torch.Tensor:
    """(8, L) float: 1 where token (raster order) lies in octant o = 4*od + 2*oh + ow."""
    half = grid // 2
    idx = torch.arange(grid, device=device)
    bit = (idx >= half).long()
    od, oh, ow = torch.meshgrid(bit, bit, bit, indexing="ij")
    oct_of_token = (4 * od + 2 * oh + ow).reshape(-1)
    return (oct_of_token[None, :] == torch.arange(8, device=device)[:, None]).float()


def random_mask(n: int, length: int, keep: int, device, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE random masking: ids_keep (n, keep) ascending, mask (n, L) with 1 at masked tokens."""
    noise = torch.rand(n, length, device=device, generator=generator)
    ids_keep = noise.argsort(dim=1)[:, :keep].sort(dim=1).values
    mask = torch.ones(n, length, device=device)
    mask.scatter_(1, ids_keep, 0.0)
    return ids_keep, mask


@dataclass
class MaskDraw:
    """Every random choice of one step's views, as index tensors (device-independent when saved).

    octants: (B, k) masked level-1 octants, ascending (MiM) -- or ids1: (B, K1) visible level-1
    tokens (plain MAE); ids2: (B*k, K2); token3: (B*k, picks) masked level-2 tokens turned into
    level-3 views; ids3: (B*k*picks, K3). Entries of levels that are not used are None.
    """

    octants: torch.Tensor | None = None
    ids1: torch.Tensor | None = None
    ids2: torch.Tensor | None = None
    token3: torch.Tensor | None = None
    ids3: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if v is not None}

    def to(self, device) -> "MaskDraw":
        return MaskDraw(**{k: v.to(device) for k, v in self.tensors().items()})


def draw_masks(batch: int, model: ModelConfig, masking: MaskingConfig, device=None,
               generator: torch.Generator | None = None) -> MaskDraw:
    """Draw every mask of a step for ``batch`` crops (see the module docstring for the rules)."""
    length = model.grid**3
    if masking.levels == 1:
        ids1, _ = random_mask(batch, length, kept_count(length, masking.level1_ratio), device, generator)
        return MaskDraw(ids1=ids1)
    k = octants_masked(masking.level1_ratio)
    octants = torch.rand(batch, 8, device=device, generator=generator).argsort(dim=1)[:, :k].sort(dim=1).values
    n2 = batch * k
    ids2, mask2 = random_mask(n2, length, kept_count(length, masking.level2_ratio), device, generator)
    if masking.levels == 2:
        return MaskDraw(octants=octants, ids2=ids2)
    noise = torch.rand(n2, length, device=device, generator=generator) + 2.0 * (1.0 - mask2)  # visible sort last
    token3 = noise.argsort(dim=1)[:, : masking.level3_picks]  # all masked in level 2
    ids3, _ = random_mask(n2 * masking.level3_picks, length, kept_count(length, masking.level3_ratio), device, generator)
    return MaskDraw(octants=octants, ids2=ids2, token3=token3, ids3=ids3)


def _mask_from_ids(ids_keep: torch.Tensor, length: int) -> torch.Tensor:
    mask = torch.ones(ids_keep.shape[0], length, device=ids_keep.device)
    return mask.scatter_(1, ids_keep, 0.0)


def make_views(crops: torch.Tensor, model: ModelConfig, masking: MaskingConfig,
               generator: torch.Generator | None = None, draw: MaskDraw | None = None) -> list[LevelViews]:
    """crops: (B, C, 2V, 2V, 2V) -> [level 1, level 2, level 3] views (as many as masking.levels).

    The masks come from ``draw`` when given (e.g. a saved validation set), else are drawn now.
    """
    v, p, g = model.view_size, model.patch_size, model.grid
    length = g**3
    b, c = crops.shape[:2]
    if crops.dim() != 5 or c != model.in_channels or tuple(crops.shape[2:]) != (2 * v,) * 3:
        raise ValueError(f"crops must be (B, {model.in_channels}, {2 * v}, {2 * v}, {2 * v}), got {tuple(crops.shape)}")
    dev = crops.device
    if draw is None:
        draw = draw_masks(b, model, masking, dev, generator)
    else:
        draw = draw.to(dev)
    crops = crops.contiguous()
    arange_b = torch.arange(b, device=dev)

    # Every view's voxels come from one call (mim_scale.ops: the fused view kernel where `auto` enables it,
    # the torch reference otherwise); the index bookkeeping below stays here.
    empty = torch.zeros((b, 0), dtype=torch.long, device=dev)
    octants = draw.octants if masking.levels >= 2 else empty
    picks = (draw.token3.view(b, octants.shape[1], -1) if masking.levels >= 3
             else torch.zeros((b, octants.shape[1], 0), dtype=torch.long, device=dev))
    x1, x2, x3 = ops.make_views(crops, octants, picks, p)
    if masking.levels == 1:
        return [LevelViews(1, x1, _mask_from_ids(draw.ids1, length), draw.ids1, arange_b)]

    oct_masked = draw.octants
    k = oct_masked.shape[1]
    member = octant_membership(g, dev)  # (8, L)
    mask1 = member[oct_masked].sum(dim=1)  # (B, L)
    ids1 = mask1.argsort(dim=1, stable=True)[:, : length - k * (length // 8)]  # visible ids, ascending
    levels = [LevelViews(1, x1, mask1, ids1, arange_b)]

    # level 2: the masked octants at full resolution
    bi = arange_b[:, None].expand(b, k)
    n2 = b * k
    levels.append(LevelViews(2, x2, _mask_from_ids(draw.ids2, length), draw.ids2, bi.reshape(-1),
                             parent=bi.reshape(-1), octant=oct_masked.reshape(-1)))
    if masking.levels == 2:
        return levels

    # level 3: masked level-2 patches, upsampled to full view size
    token = draw.token3
    parent3 = torch.arange(n2, device=dev).repeat_interleave(token.shape[1])
    levels.append(LevelViews(3, x3, _mask_from_ids(draw.ids3, length), draw.ids3, levels[1].crop_index[parent3],
                             parent=parent3, token=token.reshape(-1)))
    return levels
