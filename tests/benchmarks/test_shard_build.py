"""The shard build benchmark prints its three figures and leaves no scratch folder behind."""

from __future__ import annotations

from benchmarks.shard_build import run_bench
from mim_scale.shards.synth import phantom, write_nifti


def test_bench_prints_the_three_figures(tmp_path, capsys):
    for i in range(2):
        write_nifti(phantom((16, 48, 48), seed=100 + i), tmp_path / "in" / f"v{i:02d}.nii.gz")
    text = run_bench([str(tmp_path / "in")], repeat=1, workers=0, work_dir=tmp_path)
    assert "volumes/min/core" in text and "peak worker memory" in text and "bytes/voxel" in text
    assert "npy.gz level 1" in text and not list(tmp_path.glob("shards-bench-*"))
