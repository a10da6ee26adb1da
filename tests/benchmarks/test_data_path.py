"""The data-path benchmark runs end to end at a tiny size: one record per k, every figure present and
positive, the cores-per-GPU figure derived from the per-core rate, no scratch folder left behind."""

from __future__ import annotations

import json

from benchmarks.data_path import main


def test_bench_prints_one_record_per_k(tmp_path, capsys):
    args = ["--workdir", str(tmp_path), "--phantom-shape", "24,40,40", "--crop", "32", "--codec", "npy",
            "--k", "1,2", "--passes", "1", "--repeats", "1"]
    assert main(args) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["k"] for r in records] == [1, 2]
    for r in records:
        rates = r["crops_per_s_per_core"]
        assert set(rates) >= {"ours_int16", "ours_window_on_cpu", "ours_before_float32", "monai_uncached",
                              "monai_persistent_warm"} and min(rates.values()) > 0
        assert r["crops_per_s_wall"]["ours_loader_1_worker"] > 0
        assert r["loader_cores_per_gpu"]["ours"] == round(20.0 / rates["ours_int16"], 2)
        assert r["bytes_per_crop"] == {"ours_int16": 2 * 32**3, "float32_before_and_monai": 4 * 32**3}
        assert r["persistent_cache_misses"]["warm_passes"] == 0
    assert not list(tmp_path.iterdir())
