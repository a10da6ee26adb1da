"""Fine-tuning the pre-trained hybrid encoder: segmentation (UNETR-style MONAI decoder) and classification.

- :func:`finetune` trains one run (``mim-scale finetune``); :func:`evaluate_run` and :func:`compare_inits`
  write the JSON reports of ``mim-scale evaluate``.
- Recipes (spacing, HU window, ROI, augmentation, optimisation) are in :mod:`.recipe`; the evaluation
  protocol for the paper's downstream sets is in ``PROTOCOL.md`` next to this file.
"""

from mim_scale.finetune.evaluate import compare_inits, evaluate_run
from mim_scale.finetune.networks import ClassificationNet, SegmentationNet
from mim_scale.finetune.recipe import Recipe, load_recipe
from mim_scale.finetune.train import finetune

__all__ = ["ClassificationNet", "Recipe", "SegmentationNet", "compare_inits", "evaluate_run", "finetune",
           "load_recipe"]
