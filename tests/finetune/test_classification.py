"""Classification on a task derived from the real CT: does a ~96 x 96 x 40 mm slab contain liver?

Slabs for training are cut from the plain abdomen/pelvis scan, slabs for validation from the
contrast-enhanced DICOM series (see finetune_ct.write_liver_crops); the labels come from the organ
masks. Classes are imbalanced (about 1 in 9 training slabs holds liver), so the sampler balances them;
the head pools the last stage with a global max.
"""

from __future__ import annotations

import csv
import json

from mim_scale.finetune.train import finetune

RECIPE = {
    "task": "classification",
    "preprocessing": {"spacing": [3.0, 3.0, 3.0], "hu_min": -175.0, "hu_max": 250.0, "roi_size": [32, 32, 32]},
    "augmentation": {"flip_prob": 0.0, "rot90_prob": 0.0, "intensity_scale": 0.15, "intensity_shift": 0.15,
                     "intensity_prob": 0.8},
    "train": {"steps": 150, "batch_size": 8, "lr": 5e-4, "warmup_steps": 5, "weight_decay": 0.05,
              "balanced_sampling": True, "log_every": 50, "threads": 1},
    "network": {"pooling": "max"},
}


def test_liver_slab_classifier_beats_chance_on_the_other_scan(cls_dataset, tmp_path):
    rows = list(csv.DictReader(cls_dataset.open()))
    val = [r for r in rows if r["split"] == "validation"]
    positives = sum(r["label"] == "1" for r in val)
    assert 0 < positives < len(val)
    summary = finetune(cls_dataset, "scratch", tmp_path / "run", recipe=RECIPE, model_config="tiny",
                       log=lambda m: None)
    v = summary["validation"]
    print("classification:", json.dumps({k: v[k] for k in ("accuracy", "balanced_accuracy", "auc", "n")}))
    assert v["n"] == len(val) and summary["classes"] == ["class_0", "class_1"]
    # a constant answer scores balanced accuracy 0.5 and AUC 0.5
    assert v["balanced_accuracy"] > 0.65
    assert v["auc"] > 0.8
