"""The masking/patching operations the model uses, through ``mim_scale.ops`` when it dispatches.

``mim_scale.ops`` may expose fused versions with the reference signatures (for example
``mim_scale.ops.masked_norm_pix_mse``); when it does, those are used, otherwise the plain-torch
references in :mod:`mim_scale.ops.reference`.
"""

from __future__ import annotations

import mim_scale.ops as _ops
from mim_scale.ops import reference as _ref

patchify = getattr(_ops, "patchify", _ref.patchify)
unpatchify = getattr(_ops, "unpatchify", _ref.unpatchify)
norm_pix_target = getattr(_ops, "norm_pix_target", _ref.norm_pix_target)
masked_norm_pix_mse = getattr(_ops, "masked_norm_pix_mse", _ref.masked_norm_pix_mse)
gather_tokens = getattr(_ops, "gather_tokens", _ref.gather_tokens)
scatter_tokens = getattr(_ops, "scatter_tokens", _ref.scatter_tokens)
upsample_token_mask = getattr(_ops, "upsample_token_mask", _ref.upsample_token_mask)

__all__ = ["patchify", "unpatchify", "norm_pix_target", "masked_norm_pix_mse", "gather_tokens",
           "scatter_tokens", "upsample_token_mask"]
