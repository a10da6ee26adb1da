"""Command-line errors name the input at fault and exit with status 2, before any training."""

from __future__ import annotations

from mim_scale.cli import main


def test_finetune_and_evaluate_input_errors(seg_dataset, tmp_path, capsys):
    data = str(seg_dataset)
    cases = [
        (["finetune", "--data", data, "--init", str(tmp_path / "nope"), "--out", str(tmp_path / "r")],
         "no such exported encoder"),
        (["finetune", "--data", data, "--init", "scratch", "--out", str(tmp_path / "r")], "needs --model"),
        (["finetune", "--data", str(tmp_path / "missing.json"), "--init", "scratch", "--model", "tiny",
          "--out", str(tmp_path / "r")], "dataset file not found"),
        (["finetune", "--data", data, "--init", "scratch", "--model", "tiny", "--recipe", "sample_ct",
          "--set", "preprocessing.roi_size=[40, 40, 40]", "--out", str(tmp_path / "r")],
         "preprocessing.roi_size: [40, 40, 40] must be divisible by 16"),
        (["finetune", "--data", data, "--init", "scratch", "--model", "tiny", "--set", "train.lr=-1",
          "--out", str(tmp_path / "r")], "train.lr: must be > 0"),
        (["evaluate", "--out", str(tmp_path / "x.json")], "either --run"),
        (["evaluate", "--run", str(tmp_path), "--out", str(tmp_path / "x.json")], "run.json"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
    assert not (tmp_path / "r" / "checkpoints").exists()
