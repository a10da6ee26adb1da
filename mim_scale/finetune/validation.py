"""Validation metrics: sliding-window per-class Dice (segmentation), accuracy/AUC (classification).

Dice is computed on the recipe grid (after reorientation and resampling), the usual protocol for
BTCV/MSD validation during fine-tuning. A class absent from a volume's ground truth is skipped for that
volume (MONAI's ``ignore_empty``), and reported as ``null`` when absent from every volume.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.metrics import compute_dice, compute_roc_auc
from torch import nn

from mim_scale.finetune.recipe import Recipe


def autocast(device: torch.device, precision: str):
    """bf16 autocast for the forward pass, or a no-op context for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def predict_volume(model: nn.Module, image: torch.Tensor, roi: tuple[int, int, int], recipe: Recipe) -> torch.Tensor:
    """image: (1, X, Y, Z) on the CPU -> class indices (X, Y, Z) on the CPU.

    Sliding window with the recipe's overlap and blending; windows run on the model's device and
    are stitched on the CPU, so a whole volume never has to fit in device memory.
    """
    e = recipe.eval
    device = model_device(model)
    with autocast(device, recipe.train.precision):
        logits = sliding_window_inference(image[None].float(), roi, e.sw_batch_size, model, overlap=e.sw_overlap,
                                          mode=e.sw_mode, sw_device=device, device=torch.device("cpu"))
    return logits.float().argmax(1)[0]


def segmentation_metrics(model: nn.Module, volumes: list[dict[str, Any]], roi: tuple[int, int, int],
                         recipe: Recipe, names: list[str]) -> dict[str, Any]:
    """Per-class Dice over the validation volumes: {'per_class_dice', 'mean_dice', 'per_volume'}."""
    was_training = model.training
    model.eval()
    num_classes = len(names)
    rows = []
    for vol in volumes:
        pred = predict_volume(model, torch.as_tensor(vol["image"]), roi, recipe)
        gt = torch.as_tensor(vol["label"])[0].round().long()
        pred_1h = F.one_hot(pred, num_classes).permute(3, 0, 1, 2)[None].float()
        gt_1h = F.one_hot(gt.clamp(0, num_classes - 1), num_classes).permute(3, 0, 1, 2)[None].float()
        dice = compute_dice(pred_1h, gt_1h, include_background=False, ignore_empty=True)[0]
        rows.append({
            "image": str(vol.get("image_path", "")),
            "dice": {names[c]: _num(dice[c - 1]) for c in range(1, num_classes)},
            "voxels_gt": {names[c]: int((gt == c).sum()) for c in range(1, num_classes)},
            "voxels_pred": {names[c]: int((pred == c).sum()) for c in range(1, num_classes)},
        })
    model.train(was_training)
    per_class = {}
    for c in range(1, num_classes):
        vals = [r["dice"][names[c]] for r in rows if r["dice"][names[c]] is not None]
        per_class[names[c]] = sum(vals) / len(vals) if vals else None
    present = [v for v in per_class.values() if v is not None]
    return {"per_class_dice": per_class, "mean_dice": sum(present) / len(present) if present else None,
            "per_volume": rows}


@torch.inference_mode()
def classification_metrics(model: nn.Module, items: list[dict[str, Any]], names: list[str],
                           precision: str = "fp32") -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class recall, cross-entropy and (binary) ROC AUC."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    with autocast(device, precision):
        logits = torch.cat([model(torch.as_tensor(it["image"])[None].float().to(device)).float().cpu()
                            for it in items])
    labels = torch.tensor([int(it["label"]) for it in items])
    model.train(was_training)
    pred = logits.argmax(1)
    recall = {}
    for c, name in enumerate(names):
        sel = labels == c
        recall[name] = float((pred[sel] == c).float().mean()) if sel.any() else None
    present = [v for v in recall.values() if v is not None]
    out: dict[str, Any] = {
        "accuracy": float((pred == labels).float().mean()),
        "balanced_accuracy": sum(present) / len(present),
        "per_class_recall": recall,
        "loss": float(F.cross_entropy(logits, labels)),
        "n": len(items),
    }
    if len(names) == 2 and 0 < int(labels.sum()) < len(labels):
        out["auc"] = float(compute_roc_auc(logits.softmax(1)[:, 1], labels))
    return out


def _num(x: torch.Tensor) -> float | None:
    v = float(x)
    return None if math.isnan(v) else v


def headline(metrics: dict[str, Any]) -> float | None:
    """The single number a run is ranked by: mean Dice, or accuracy."""
    return metrics.get("mean_dice", metrics.get("accuracy"))
