"""The MiM model: hybrid 3D encoder, MAE decoder, level views, losses (MIM_METHOD.md).

Public API::

    model = build_model(cfg)                       # MiMModel, single device
    losses = model(crops, generator=g, progress=t)  # dict of 0-dim tensors, losses["total"]
    model.encoder.state_dict()                     # the exported foundation weights (key schema v1)
    build_encoder(cfg.model).forward_features(x)   # dense per-stage features for fine-tuning
    flops_per_sample(cfg)                          # analytic training FLOPs per crop (for MFU)
    param_groups(model, weight_decay)              # AdamW groups
"""

from mim_scale.model.encoder import KEY_SCHEMA_VERSION, HybridEncoder, build_encoder
from mim_scale.model.flops import flops_per_sample, forward_flops
from mim_scale.model.mim import MiMModel, build_model
from mim_scale.model.optim import param_groups
from mim_scale.model.views import LevelViews, MaskDraw, draw_masks, make_views

__all__ = ["KEY_SCHEMA_VERSION", "HybridEncoder", "build_encoder", "MiMModel", "build_model", "flops_per_sample",
           "forward_flops", "param_groups", "LevelViews", "MaskDraw", "draw_masks", "make_views"]
