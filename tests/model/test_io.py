"""mim_scale.model.io: reading exported encoders (the loading API below the engine), without a training run."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from mim_scale.config import load_config
from mim_scale.errors import UserFacingError
from mim_scale.export_store import ExportIntegrityError, write_sums
from mim_scale.model import build_encoder
from mim_scale.model.io import (CONFIG_FILE, ENCODER_FILE, KeyMismatchError, encoder_file_metadata, load_encoder,
                                load_encoder_weights)


def _export(folder, cfg, schema: str | None = None):
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model)
    meta = encoder_file_metadata("test")
    if schema is not None:
        meta["schema_version"] = schema
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(folder / ENCODER_FILE), metadata=meta)
    (folder / CONFIG_FILE).write_text(json.dumps({"model": cfg.to_dict()["model"]}))
    write_sums(folder)
    return encoder


def test_an_export_folder_loads_strictly_and_tampering_is_refused(tmp_path):
    cfg = load_config("tiny")
    original = _export(tmp_path / "exp", cfg)
    encoder, config = load_encoder(tmp_path / "exp")
    assert config["load_report"] == {"missing": [], "unexpected": []}
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), encoder.state_dict().values()))
    other = build_encoder(dataclasses.replace(cfg.model, encoder_depth=cfg.model.encoder_depth + 1))
    with pytest.raises(KeyMismatchError):  # a different architecture: keys differ
        load_encoder_weights(other, tmp_path / "exp")
    data = bytearray((tmp_path / "exp" / ENCODER_FILE).read_bytes())
    data[-1] ^= 1
    (tmp_path / "exp" / ENCODER_FILE).write_bytes(bytes(data))
    with pytest.raises(ExportIntegrityError, match="does not match"):
        load_encoder(tmp_path / "exp")


def test_a_newer_key_schema_is_refused_by_name(tmp_path):
    _export(tmp_path / "exp", load_config("tiny"), schema="99")
    with pytest.raises(UserFacingError, match="key schema 99 is newer"):
        load_encoder(tmp_path / "exp")
