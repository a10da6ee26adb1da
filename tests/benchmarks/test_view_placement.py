"""The view-placement measurement runs and counts the views and bytes of a MiM sample right."""

from benchmarks.view_placement import measure


def test_view_placement_measures_tiny():
    r = measure("tiny", batch=1, steps=1)
    assert r["views"] == 21  # 1 + 4 + 16 views per crop
    assert r["bytes_ratio_views_vs_crops"] == 21 / 8  # 21 views of V^3 against one (2V)^3 crop
    assert 0 < r["view_build_s"] and 0 < r["view_share_of_step"] < 1
