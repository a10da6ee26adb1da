"""The model's import point for the ops it uses: the dispatcher's functions, nothing else.

Dispatch (fused kernel or torch reference, per device and backend) happens in one place, ``mim_scale.ops``;
this module only names what the model takes from it.
"""

from __future__ import annotations

from mim_scale.ops import (gather_tokens, make_views, masked_depthwise_conv3d, masked_norm_pix_mse,
                           norm_pix_target, patchify, scatter_tokens, unpatchify, upsample_token_mask)

__all__ = ["gather_tokens", "make_views", "masked_depthwise_conv3d", "masked_norm_pix_mse", "norm_pix_target",
           "patchify", "scatter_tokens", "unpatchify", "upsample_token_mask"]
