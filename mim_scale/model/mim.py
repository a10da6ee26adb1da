"""MiMModel: views -> one batched encoder/decoder pass -> per-level losses and alignment.

Single-device and free of torch.distributed: the engine wraps it (DeepSpeed, ZeRO) from outside.

View batching (``token_batching``): the conv stages, the fusion and the decoder see every view
of every level in one call (all views are V^3 and the decoder runs on all L tokens). Only the
transformer stage depends on the visible-token count K, which differs between levels (108 / 86 /
108 at base). Modes:

- ``"bucket"`` (default): one transformer call per distinct K (levels 1 and 3 share one at base),
  no padding, so no attention mask and no wasted tokens;
- ``"pad"``: a single transformer call, shorter levels padded to the longest K with a key mask;
- ``"level"``: one full encoder+decoder call per level (what the published code does); kept for
  benchmarking against it.

``python benchmarks/model_step.py --compare-batching`` measures them; see the README note there.
"""

from __future__ import annotations

import torch
from torch import nn

from mim_scale.config import Config
from mim_scale.model.decoder import MaskedDecoder
from mim_scale.model.encoder import HybridEncoder, token_keep_mask
from mim_scale.model.losses import AlignHead, alignment_loss, rec_weights_at
from mim_scale.model.ops import masked_norm_pix_mse, patchify, unpatchify, upsample_token_mask
from mim_scale.model.views import LevelViews, MaskDraw, make_views, octant_membership

TOKEN_BATCHING = ("bucket", "pad", "level")


class MiMModel(nn.Module):
    """The full pre-training model: ``encoder`` (exported), ``decoder``, alignment heads.

    forward(crops (B, C, 2V, 2V, 2V) in [0, 1]) -> dict of 0-dim tensors:
    ``rec_l1`` [``rec_l2``, ``rec_l3``, ``align_12``, ``align_23``], ``total`` (the weighted sum, the
    only one that carries gradients to optimise), and detached monitors ``z_std_12`` / ``z_std_23``
    (collapse monitor on centred z, :func:`~mim_scale.model.losses.centred_z_std`), ``zraw_std_12`` /
    ``zraw_std_23`` (the uncentred one), ``tokens`` (visible tokens through the transformer, per crop) and ``views``
    (masked views per crop).
    """

    def __init__(self, cfg: Config, token_batching: str = "bucket"):
        super().__init__()
        if token_batching not in TOKEN_BATCHING:
            raise ValueError(f"token_batching must be one of {', '.join(TOKEN_BATCHING)}, got {token_batching!r}")
        self.cfg = cfg
        m = cfg.model
        self.levels = cfg.masking.levels
        self.token_batching = token_batching
        self.patch_size = m.patch_size
        self.encoder = HybridEncoder(m)
        self.decoder = MaskedDecoder(m.embed_dim, m.decoder_dim, m.decoder_depth, m.decoder_heads, m.mlp_ratio,
                                     m.qkv_bias, m.grid, m.patch_size, m.in_channels, m.activation_checkpointing)
        self.align_12 = AlignHead(m.decoder_dim) if self.levels >= 2 else None
        self.align_23 = AlignHead(m.decoder_dim) if self.levels >= 3 else None

    # -- views and the batched pass -------------------------------------------------------------

    def make_views(self, crops: torch.Tensor, generator: torch.Generator | None = None,
                   draw: MaskDraw | None = None) -> list[LevelViews]:
        with torch.no_grad():
            return make_views(crops, self.cfg.model, self.cfg.masking, generator, draw)

    def _param_dtype(self) -> torch.dtype:
        return self.encoder.token_proj.weight.dtype

    def encode_decode(self, levels: list[LevelViews]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Run every level's views through encoder and decoder -> [(features, pred)] per level.

        features: (N_l, L, decoder_dim); pred: (N_l, L, p^3 * C).
        """
        if self.token_batching == "level":
            return [self._encode_decode_group([lv])[0] for lv in levels]
        return self._encode_decode_group(levels)

    def _encode_decode_group(self, levels: list[LevelViews]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        enc = self.encoder
        length = enc.grid**3
        dtype = self._param_dtype()
        # levels with equal K adjacent, so each bucket is one contiguous slice
        order = sorted(range(len(levels)), key=lambda i: -levels[i].num_keep)
        ordered = [levels[i] for i in order]
        k_max = ordered[0].num_keep
        x = torch.cat([lv.x for lv in ordered]).to(dtype)
        ids = torch.cat([_pad_ids(lv.ids_keep, k_max) for lv in ordered])
        valid = torch.cat([_valid(lv.ids_keep, k_max) for lv in ordered])
        all_valid = all(lv.num_keep == k_max for lv in ordered)
        keep = token_keep_mask(ids, None if all_valid else valid, length)

        enc._check_input(x)
        tokens, fused = enc.masked_token_inputs(x, keep)
        if self.token_batching == "pad" or all_valid:
            latent = enc.encode_visible(tokens, fused, ids, None if all_valid else valid)
        else:
            parts, start = [], 0
            for k, group in _buckets(ordered):
                n = sum(lv.num_views for lv in group)
                sl = slice(start, start + n)
                lat = enc.encode_visible(tokens[sl], fused[sl], ids[sl, :k])
                parts.append(torch.nn.functional.pad(lat, (0, 0, 0, k_max - k)))
                start += n
            latent = torch.cat(parts)
        dec_feats, pred = self.decoder(latent, ids, None if all_valid else valid)

        out: list = [None] * len(levels)
        start = 0
        for i, lv in zip(order, ordered):
            sl = slice(start, start + lv.num_views)
            out[i] = (dec_feats[sl], pred[sl])
            start += lv.num_views
        return out

    # -- the training step ----------------------------------------------------------------------

    def forward(self, crops: torch.Tensor, *, generator: torch.Generator | None = None,
                progress: float = 0.0, draw: MaskDraw | None = None) -> dict[str, torch.Tensor]:
        """crops: (B, C, 2V, 2V, 2V) in [0, 1]. Masks are drawn with ``generator`` (on the crops'
        device; torch's global RNG when None) unless ``draw`` gives them (validation).
        ``progress`` in [0, 1] drives the optional ``loss.schedule = "sincos"``."""
        losses, _ = self.step(crops, generator=generator, progress=progress, draw=draw)
        return losses

    def step(self, crops: torch.Tensor, *, generator: torch.Generator | None = None, progress: float = 0.0,
             draw: MaskDraw | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        """Like :meth:`forward`, also returning the views and per-level (features, pred) for tests/pictures."""
        levels = self.make_views(crops, generator, draw)
        results = self.encode_decode(levels)
        lo = self.cfg.loss
        p = self.patch_size
        weights = rec_weights_at(lo.rec_weights, lo.schedule, progress)
        out: dict[str, torch.Tensor] = {}
        total = 0.0
        for lv, (_, pred) in zip(levels, results):
            rec = masked_norm_pix_mse(pred, lv.x, lv.mask, p, lo.norm_pix_eps)
            out[f"rec_l{lv.level}"] = rec
            total = total + weights[lv.level - 1] * rec
        if self.levels >= 2:
            loss, monitors = alignment_loss(*self.align_pairs_12(levels, results), self.align_12, lo.align_variant)
            out["align_12"], out["z_std_12"], out["zraw_std_12"] = loss, monitors["z_std"], monitors["z_std_raw"]
            total = total + lo.align_weights[0] * loss
        if self.levels >= 3:
            loss, monitors = alignment_loss(*self.align_pairs_23(levels, results), self.align_23, lo.align_variant)
            out["align_23"], out["z_std_23"], out["zraw_std_23"] = loss, monitors["z_std"], monitors["z_std_raw"]
            total = total + lo.align_weights[1] * loss
        out["total"] = total
        b = crops.shape[0]
        dev = out["total"].device
        out["tokens"] = torch.tensor(sum(lv.num_views * lv.num_keep for lv in levels) / b, device=dev)
        out["views"] = torch.tensor(sum(lv.num_views for lv in levels) / b, device=dev)
        return out, {"levels": levels, "results": results}

    def align_pairs_12(self, levels: list[LevelViews], results) -> tuple[torch.Tensor, torch.Tensor]:
        """(parent, child), each (N_2, D): parent = mean level-1 feature over the octant each level-2
        view came from; child = mean of that level-2 view's features."""
        feats1, feats2 = results[0][0], results[1][0]
        lv2 = levels[1]
        member = octant_membership(self.encoder.grid, feats1.device)
        w = (member / member.sum(dim=1, keepdim=True))[lv2.octant].to(feats1.dtype)  # (N2, L)
        parent = torch.einsum("nl,nld->nd", w, feats1[lv2.parent])
        return parent, feats2.mean(dim=1)

    def align_pairs_23(self, levels: list[LevelViews], results) -> tuple[torch.Tensor, torch.Tensor]:
        """(parent, child), each (N_3, D): parent = the level-2 feature of the token each level-3 view
        was cut from; child = mean of that level-3 view's features."""
        feats2, feats3 = results[1][0], results[2][0]
        lv3 = levels[2]
        return feats2[lv3.parent, lv3.token], feats3.mean(dim=1)

    # -- pictures -------------------------------------------------------------------------------

    @torch.no_grad()
    def reconstruct(self, crops: torch.Tensor, generator: torch.Generator | None = None,
                    max_views: int = 2, draw: MaskDraw | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Pictures of one step: ``{"l1": {...}, "l2": {...}, ...}``, each holding CPU float tensors

        ``input`` (n, C, V, V, V) the view, ``masked`` (masked voxels zeroed), ``mask`` (n, 1, V, V, V)
        1 at visible voxels, ``pred`` the prediction un-normalised with each patch's target mean and
        std (so it looks like the image), ``composite`` (visible voxels from the input, masked ones
        from the prediction); ``n = min(max_views, views of that level)``.
        """
        was_training = self.training
        self.eval()
        try:
            levels = self.make_views(crops, generator, draw)
            results = self.encode_decode(levels)
        finally:
            self.train(was_training)
        p, g, eps = self.patch_size, self.encoder.grid, self.cfg.loss.norm_pix_eps
        c, v = self.cfg.model.in_channels, self.cfg.model.view_size
        out = {}
        for lv, (_, pred) in zip(levels, results):
            n = min(max_views, lv.num_views)
            x = lv.x[:n].float()
            target = patchify(x, p)
            mean = target.mean(dim=-1, keepdim=True)
            std = torch.sqrt(target.var(dim=-1, unbiased=False, keepdim=True) + eps)
            pred_img = unpatchify(pred[:n].float() * std + mean, p, (g, g, g), c)
            keep = upsample_token_mask(1.0 - lv.mask[:n], g, v).float()
            out[f"l{lv.level}"] = {
                "input": x.cpu(),
                "masked": (x * keep).cpu(),
                "mask": keep.cpu(),
                "pred": pred_img.cpu(),
                "composite": (x * keep + pred_img * (1 - keep)).cpu(),
            }
        return out


def _pad_ids(ids: torch.Tensor, k: int) -> torch.Tensor:
    return torch.nn.functional.pad(ids, (0, k - ids.shape[1]), value=0)


def _valid(ids: torch.Tensor, k: int) -> torch.Tensor:
    v = torch.ones(ids.shape[0], k, dtype=torch.bool, device=ids.device)
    v[:, ids.shape[1]:] = False
    return v


def _buckets(ordered: list[LevelViews]):
    groups: list[tuple[int, list[LevelViews]]] = []
    for lv in ordered:
        if groups and groups[-1][0] == lv.num_keep:
            groups[-1][1].append(lv)
        else:
            groups.append((lv.num_keep, [lv]))
    return groups


def build_model(cfg: Config, token_batching: str = "bucket") -> MiMModel:
    """The pre-training model for ``cfg`` (single device; the engine adds parallelism)."""
    return MiMModel(cfg, token_batching=token_batching)
