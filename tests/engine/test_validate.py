"""The engine's fixed validation set: drawn from the shards once, saved, found again by a resumed or a
second run, refused when it was drawn for another geometry or masking."""

from __future__ import annotations

import pytest
import torch

from mim_scale.engine.validate import load_or_draw_validation_set, validation_set_path
from mim_scale.errors import UserFacingError


def test_drawn_once_saved_and_reloaded(engine_shards, tiny_config, tmp_path):
    path = tmp_path / "sets" / "val.safetensors"
    cfg = tiny_config(engine_shards, f"train.validation_set={path}", "train.validation_crops=3")
    assert validation_set_path(cfg, tmp_path / "run") == path
    drawn = load_or_draw_validation_set(cfg, tmp_path / "run", rank=0)
    assert path.is_file() and len(drawn) == 3
    assert drawn.crops.std() > 0.01  # real CT
    # another rank (which does not write) draws exactly the same set
    other = load_or_draw_validation_set(tiny_config(engine_shards, "train.validation_crops=3"), tmp_path / "r1", rank=1)
    assert torch.equal(other.crops, drawn.crops) and torch.equal(other.draw.ids3, drawn.draw.ids3)
    assert not (tmp_path / "r1" / "validation_set.safetensors").exists()
    # a later run with other training seeds finds the saved file, not a new draw
    later = load_or_draw_validation_set(tiny_config(engine_shards, f"train.validation_set={path}", "data.seed=9",
                                                    "train.seed=9"), tmp_path / "run2", rank=0)
    assert torch.equal(later.crops, drawn.crops) and torch.equal(later.draw.ids2, drawn.draw.ids2)


def test_set_for_other_masking_is_refused(engine_shards, tiny_config, tmp_path):
    path = tmp_path / "val.safetensors"
    load_or_draw_validation_set(tiny_config(engine_shards, f"train.validation_set={path}"), tmp_path, rank=0)
    other = tiny_config(engine_shards, f"train.validation_set={path}", "masking.level2_ratio=0.75")
    with pytest.raises(UserFacingError, match=r"val\.safetensors: drawn for masking"):
        load_or_draw_validation_set(other, tmp_path, rank=0)
