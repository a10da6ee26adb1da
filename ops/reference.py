"""Every op's plain-torch reference, under the op's name: the ground truth the kernels are tested against.

Each reference lives in its op's file (``loss.py``, ``gather.py``, ``scatter.py``, ``views.py``,
``depthwise.py``) beside its kernel; this module only gathers them for readers and scripts that want the torch
path without the dispatcher (``from mim_scale.ops import reference as R``). Conventions: :mod:`.patches`.
"""

from __future__ import annotations

from .depthwise import reference as masked_depthwise_conv3d
from .gather import reference as gather_tokens
from .loss import reference as masked_norm_pix_mse
from .patches import norm_pix_target, patchify, unpatchify, upsample_token_mask
from .scatter import reference as scatter_tokens
from .views import apply_token_mask, downsample2x, octant_origin, octant_views, patch_views
from .views import reference as make_views

__all__ = ["apply_token_mask", "downsample2x", "gather_tokens", "make_views", "masked_depthwise_conv3d",
           "masked_norm_pix_mse", "norm_pix_target", "octant_origin", "octant_views", "patch_views", "patchify",
           "scatter_tokens", "unpatchify", "upsample_token_mask"]
