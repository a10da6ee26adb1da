"""Recipes: shipped files, precedence (defaults < exported preprocessing < file < overrides), errors."""

from __future__ import annotations

import pytest

from mim_scale.config import ConfigError
from mim_scale.finetune.recipe import load_recipe, shipped_recipes

# what `mim-scale export` writes into config.json["preprocessing"]
EXPORTED = {"orientation": "SPL", "spacing_mm": 2.0, "hu_min": -1000.0, "hu_max": 1000.0,
            "scaling": "clip HU to [hu_min, hu_max], then (hu - hu_min) / (hu_max - hu_min) -> [0, 1]"}


def test_shipped_recipes_carry_the_papers_preprocessing():
    assert {"btcv", "msd_spleen", "msd_lung"} <= set(shipped_recipes())
    btcv = load_recipe("btcv")
    # the paper's 1.5 x 1.5 x 2.0 mm (x, y, z), in the pre-training arrays' axis order S, P, L
    assert btcv.preprocessing.orientation == "SPL" and btcv.preprocessing.spacing == (2.0, 1.5, 1.5)
    assert (btcv.preprocessing.hu_min, btcv.preprocessing.hu_max) == (-175.0, 250.0)
    assert btcv.preprocessing.roi_size == (96, 96, 96)
    assert btcv.eval.sw_overlap == 0.5
    spleen = load_recipe("msd_spleen")
    assert spleen.preprocessing.spacing == (1.0, 1.0, 1.0)
    assert (spleen.preprocessing.hu_min, spleen.preprocessing.hu_max) == (-57.0, 175.0)
    assert spleen.augmentation == btcv.augmentation  # inherited through `extends`
    lung = load_recipe("msd_lung")
    assert (lung.preprocessing.hu_min, lung.preprocessing.hu_max) == (-1000.0, 1000.0)


def test_exported_preprocessing_is_the_default_and_recipes_override_it(tmp_path):
    r = load_recipe(None, preprocessing=EXPORTED)
    assert r.preprocessing.spacing == (2.0, 2.0, 2.0)
    assert (r.preprocessing.hu_min, r.preprocessing.hu_max) == (-1000.0, 1000.0)
    f = tmp_path / "mine.toml"
    f.write_text('extends = "btcv"\n[preprocessing]\nhu_max = 300.0\n')
    r = load_recipe(f, overrides=["train.steps=7", "preprocessing.spacing=[3.0, 3.0, 3.0]"], preprocessing=EXPORTED)
    assert r.preprocessing.hu_min == -175.0  # from btcv, over the export
    assert r.preprocessing.hu_max == 300.0  # from the file, over btcv
    assert r.preprocessing.spacing == (3.0, 3.0, 3.0)  # override, over everything
    assert r.train.steps == 7 and r.name == "mine"


def test_recipe_orientation_other_than_the_encoders_is_warned(logged):
    caplog = logged("mim_scale.finetune.recipe")
    load_recipe("btcv", preprocessing=EXPORTED)
    assert not caplog.records  # shipped recipes orient like pre-training
    r = load_recipe("btcv", ['preprocessing.orientation="RAS"'], preprocessing=EXPORTED)
    assert r.preprocessing.orientation == "RAS"  # the user's choice stands, with a warning
    assert "differs from the encoder's pre-training orientation SPL" in caplog.text


@pytest.mark.parametrize("override, key", [
    ("preprocessing.hu_max=-2000.0", "preprocessing.hu_max"),
    ("preprocessing.spacing=[1.0, 1.0]", "preprocessing.spacing"),
    ("preprocessing.orientation=\"XYZ\"", "preprocessing.orientation"),
    ("preprocessing.orientation=\"SSL\"", "preprocessing.orientation"),
    ("train.layer_decay=1.5", "train.layer_decay"),
    ("task=\"detection\"", "task"),
    ("train.stepz=3", "train.stepz"),
    ("eval.sw_overlap=1.0", "eval.sw_overlap"),
    ("classes.liver=[5]", None),
])
def test_bad_values_name_the_key(override, key):
    if key is None:
        assert load_recipe(None, [override]).classes == {"liver": (5,)}
        return
    with pytest.raises(ConfigError) as err:
        load_recipe(None, [override])
    assert err.value.key == key


def test_a_label_value_cannot_feed_two_classes():
    with pytest.raises(ConfigError, match="already mapped"):
        load_recipe({"classes": {"liver": [5], "spleen": [1, 5]}})


def test_unknown_recipe_names_the_shipped_ones():
    with pytest.raises(ConfigError, match="btcv"):
        load_recipe("no_such_recipe")
