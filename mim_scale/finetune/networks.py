"""Downstream networks on the pre-trained hybrid encoder.

Both networks keep the encoder under the attribute ``encoder``, so its parameters are exactly the
``encoder.*`` keys of the network's state dict: strict key matching applies to that sub-module (the
pre-trained part), and every other module (the deeper stage, the decoder, the head) is new and randomly
initialised.

Shape contract of the encoder (``mim_scale.model``): ``forward_features(x)`` with
x: (N, C, D, H, W), D = H = W = view size, returns one dense map per stage,
``[(N, widths[0], D/2, ...), (N, widths[1], D/4, ...), ..., (N, widths[-1], D/2**S, ...)]``,
for base 48@48^3, 96@24^3, 192@12^3, 384@6^3.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from torch import nn


class LayerNorm3d(nn.Module):
    """LayerNorm over the channel axis of (N, C, D, H, W) maps."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


class DeepStage(nn.Module):
    """The extra downsampling stage of the segmentation network (not pre-trained).

    x: (N, C, d, d, d) -> (N, 2C, d/2, d/2, d/2); a stride-2 patch-embedding conv (kernel 2), LayerNorm
    and GELU, like the encoder's own stage openings, then a residual 3x3x3 conv block.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"DeepStage channels must be >= 1, got {in_channels} -> {out_channels}")
        self.embed = nn.Conv3d(in_channels, out_channels, kernel_size=2, stride=2)
        self.norm = LayerNorm3d(out_channels)
        self.act = nn.GELU()
        self.block = UnetrBasicBlock(3, out_channels, out_channels, kernel_size=3, stride=1,
                                     norm_name="instance", res_block=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.act(self.norm(self.embed(x))))


class SegmentationNet(nn.Module):
    """UNETR/SwinUNETR-style decoder from MONAI blocks on the encoder's skip levels.

    Levels (base, 96^3 input): the input itself (``input_block``, feature_size@96^3), the encoder's
    stages 48@48^3, 96@24^3, 192@12^3, 384@6^3, and ``deep``: a new stage 768@3^3. Each skip goes
    through a residual ``UnetrBasicBlock``; ``UnetrUpBlock``s climb back from the deepest level, and a
    ``UnetOutBlock`` gives logits at the input resolution.

    x: (N, in_channels, D, H, W) with D, H, W = the encoder's view size -> logits (N, out_channels, D, H, W)
    """

    def __init__(
        self,
        encoder: nn.Module,
        widths: tuple[int, ...],
        out_channels: int,
        in_channels: int = 1,
        feature_size: int = 0,
        norm_name: str = "instance",
    ):
        super().__init__()
        if not hasattr(encoder, "forward_features"):
            raise TypeError(f"encoder {type(encoder).__name__} has no forward_features(x) -> list of stage maps")
        if len(widths) < 1 or any(w < 1 for w in widths):
            raise ValueError(f"widths must be positive stage widths, got {widths}")
        if out_channels < 2:
            raise ValueError(f"out_channels must be >= 2 (background + at least one class), got {out_channels}")
        feature_size = feature_size or widths[0]
        if feature_size < 1:
            raise ValueError(f"feature_size must be >= 1, got {feature_size}")
        self.encoder = encoder
        self.widths = tuple(widths)
        self.channels = (*self.widths, 2 * self.widths[-1])  # skip levels, deepest last
        self.deep = DeepStage(self.widths[-1], self.channels[-1])

        def basic(cin: int, cout: int) -> UnetrBasicBlock:
            return UnetrBasicBlock(3, cin, cout, kernel_size=3, stride=1, norm_name=norm_name, res_block=True)

        self.input_block = basic(in_channels, feature_size)
        self.skip_blocks = nn.ModuleList(basic(c, c) for c in self.channels)
        ups = [UnetrUpBlock(3, self.channels[i], self.channels[i - 1], kernel_size=3, upsample_kernel_size=2,
                            norm_name=norm_name, res_block=True) for i in range(len(self.channels) - 1, 0, -1)]
        ups.append(UnetrUpBlock(3, self.channels[0], feature_size, kernel_size=3, upsample_kernel_size=2,
                                norm_name=norm_name, res_block=True))
        self.up_blocks = nn.ModuleList(ups)
        self.out = UnetOutBlock(3, feature_size, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 2 ** (len(self.widths) + 1)
        if any(s % factor for s in x.shape[2:]):
            raise ValueError(f"input size {tuple(x.shape[2:])} must be divisible by {factor} "
                             f"(the encoder's {len(self.widths)} stride-2 stages and the extra deep stage)")
        feats = list(self.encoder.forward_features(x))
        if len(feats) != len(self.widths):
            raise RuntimeError(f"encoder returned {len(feats)} feature maps, expected {len(self.widths)} (one per stage)")
        for i, (f, w) in enumerate(zip(feats, self.widths)):
            expect = tuple(s // 2 ** (i + 1) for s in x.shape[2:])
            if f.shape[1] != w or tuple(f.shape[2:]) != expect:
                raise RuntimeError(f"encoder stage {i} gave {tuple(f.shape[1:])}, expected ({w}, {expect}) "
                                   f"for input {tuple(x.shape[2:])}")
        feats.append(self.deep(feats[-1]))
        skips = [blk(f) for blk, f in zip(self.skip_blocks, feats)]
        h = skips[-1]
        for up, skip in zip(self.up_blocks, [*reversed(skips[:-1]), self.input_block(x)]):
            h = up(h, skip)
        return self.out(h)


class ClassificationNet(nn.Module):
    """Encoder, global pooling of the last stage, LayerNorm, dropout, linear head.

    x: (N, in_channels, D, H, W) -> logits (N, num_classes)
    """

    def __init__(self, encoder: nn.Module, widths: tuple[int, ...], num_classes: int,
                 pooling: str = "avg", dropout: float = 0.0):
        super().__init__()
        if not hasattr(encoder, "forward_features"):
            raise TypeError(f"encoder {type(encoder).__name__} has no forward_features(x) -> list of stage maps")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max', got {pooling!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.encoder = encoder
        self.pooling = pooling
        dim = widths[-1]
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = self.encoder.forward_features(x)[-1]  # (N, E, g, g, g)
        pooled = last.flatten(2).mean(-1) if self.pooling == "avg" else last.flatten(2).amax(-1)
        return self.head(self.drop(self.norm(pooled)))
