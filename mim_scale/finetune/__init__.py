"""Fine-tuning the pre-trained hybrid encoder: segmentation (UNETR-style MONAI decoder) and classification.

- :func:`finetune` trains one run (``mim-scale finetune``); :func:`evaluate_run` and :func:`compare_inits`
  write the JSON reports of ``mim-scale evaluate``; :func:`finetune_on_workers` runs on Ray Train.
- Recipes (spacing, HU window, ROI, augmentation, optimisation) are in :mod:`.recipe`; the evaluation
  protocol for the paper's downstream sets is in ``PROTOCOL.md`` next to this file.

Names are imported lazily, so ``mim-scale --help`` does not pay for importing MONAI.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ClassificationNet": "mim_scale.finetune.networks",
    "SegmentationNet": "mim_scale.finetune.networks",
    "Recipe": "mim_scale.finetune.recipe",
    "load_recipe": "mim_scale.finetune.recipe",
    "finetune": "mim_scale.finetune.train",
    "evaluate_run": "mim_scale.finetune.evaluate",
    "compare_inits": "mim_scale.finetune.evaluate",
    "finetune_on_workers": "mim_scale.finetune.distributed",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mim_scale.finetune' has no attribute {name!r}")
