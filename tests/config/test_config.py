"""The config tree: presets load, overrides apply, and every bad key or value names itself."""

from __future__ import annotations

import pytest

from mim_scale.cli import main
from mim_scale.config import SHIPPED_CONFIGS, ConfigError, load_config


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_presets_load_and_satisfy_the_coupled_sizes(name):
    cfg = load_config(name)
    m = cfg.model
    assert m.patch_size == 2 ** len(m.widths)
    assert m.view_size % m.patch_size == 0 and m.grid % 2 == 0
    assert cfg.data.crop_size == 2 * m.view_size


def test_base_is_the_papers_size():
    cfg = load_config("base")
    assert cfg.model.widths == (48, 96, 192, 384) and cfg.model.patch_size == 16
    assert cfg.model.grid == 6 and cfg.model.num_tokens == 216 and cfg.data.crop_size == 192
    assert cfg.masking.level1_ratio == 0.5 and cfg.masking.level2_ratio == 0.6 and cfg.masking.level3_picks == 4
    assert cfg.loss.rec_weights == (1.0, 1.0, 1.0) and cfg.loss.align_weights == (0.1, 0.1)


def test_overrides_are_typed():
    cfg = load_config("tiny", ["train.steps=7", "train.lr=3e-4", "launch.use_gpu=false", "data.shards=/x/y.json",
                               "model.widths=[8, 16, 32]", "data.mixture={a = 1.0, b = 2}"])
    assert cfg.train.steps == 7 and cfg.train.lr == 3e-4 and cfg.data.shards == "/x/y.json"
    assert cfg.model.widths == (8, 16, 32) and cfg.data.mixture == {"a": 1.0, "b": 2.0}


@pytest.mark.parametrize("override, key", [
    ("train.stepz=3", "train.stepz"),
    ("nope.x=1", "nope"),
    ("train.steps=many", "train.steps"),
    ("train.steps=0", "train.steps"),
    ("train.precision=fp8", "train.precision"),
    ("train.zero_stage=4", "train.zero_stage"),
    ("launch.use_gpu=1", "launch.use_gpu"),
    ("model.view_size=40", "model.view_size"),  # grid 5: odd, no octants
    ("model.view_size=36", "model.view_size"),  # not divisible by the patch size 8
    ("model.conv_depths=[1]", "model.conv_depths"),
    ("model.encoder_heads=5", "model.encoder_heads"),
    ("data.crop_size=96", "data.crop_size"),
    ("masking.level1_ratio=0.3", "masking.level1_ratio"),
    ("masking.level2_ratio=1.0", "masking.level2_ratio"),
    ("masking.level3_picks=100", "masking.level3_picks"),
    ("masking.levels=4", "masking.levels"),
    ("loss.align_variant=byol", "loss.align_variant"),
    ("loss.rec_weights=[1, 1]", "loss.rec_weights"),
    ("data.mixture={a = -1.0}", "data.mixture.a"),
    ("train.precision=fp16", "train.precision"),  # fp16 needs a GPU
    ("metrics.port=70000", "metrics.port"),
])
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", [override])
    assert info.value.key == key, str(info.value)
    assert str(info.value).startswith(key)


def test_level3_upsampling_and_picks_follow_the_sizes():
    # base: 216 tokens, 130 masked per level-2 view -> up to 130 picks; tiny: 64 tokens, 39 masked
    assert load_config("base", ["masking.level3_picks=130"]).masking.level3_picks == 130
    with pytest.raises(ConfigError, match="masking.level3_picks"):
        load_config("base", ["masking.level3_picks=131"])
    assert load_config("tiny", ["masking.level3_picks=39"]).masking.level3_picks == 39
    with pytest.raises(ConfigError, match="masking.level3_picks"):
        load_config("tiny", ["masking.level3_picks=40"])


def test_files_toml_yaml_and_extends(tmp_path):
    toml = tmp_path / "mine.toml"
    toml.write_text('extends = "tiny"\n[train]\nsteps = 3\n')
    cfg = load_config(str(toml))
    assert cfg.train.steps == 3 and cfg.model.view_size == 32 and cfg.name == "mine"
    yml = tmp_path / "mine.yaml"
    yml.write_text("extends: mine.toml\ntrain:\n  zero_stage: 3\n")
    cfg = load_config(str(yml))
    assert cfg.train.zero_stage == 3 and cfg.train.steps == 3
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsteps = = 3\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="no file"):
        load_config("tinyy")


def test_cli_fails_before_any_work_naming_the_key(capsys, tmp_path):
    rc = main(["pretrain", "--config", "tiny", "--set", "train.stepz=3", "--storage", str(tmp_path)])
    assert rc == 2
    assert "train.stepz" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was started or written


@pytest.mark.parametrize("name, datasets", [("data_1k", 2), ("data_10k", 8)])
def test_paper_collection_recipes(name, datasets):
    from mim_scale.config import shipped_names

    assert name in shipped_names() and not any(n.startswith("finetune_") for n in shipped_names())
    cfg = load_config(name)
    assert cfg.model.widths == load_config("base").model.widths
    assert len(cfg.data.mixture) == datasets and cfg.data.mixture["btcv"] < cfg.data.mixture["tcia_covid19"]
