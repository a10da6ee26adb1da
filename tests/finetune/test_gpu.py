"""CUDA checks for fine-tuning (``pytest -m gpu tests/finetune``): the paper's base-size network at
the BTCV window, and the sample-CT fine-tune on the GPU."""

from __future__ import annotations

import json
import time

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def test_base_segmentation_net_at_96_cubed_bf16():
    from mim_scale.config import load_config
    from mim_scale.finetune.networks import SegmentationNet
    from mim_scale.finetune.optim import param_groups
    from mim_scale.model.encoder import build_encoder

    cfg = load_config("base").model
    dev = torch.device("cuda")
    net = SegmentationNet(build_encoder(cfg), cfg.widths, out_channels=14).to(dev)  # BTCV: 13 organs + bg
    assert net.channels == (48, 96, 192, 384, 768)
    opt = torch.optim.AdamW(param_groups(net, 1e-5, 0.75), lr=1e-4)
    x = torch.rand(2, 1, 96, 96, 96, device=dev)
    y = torch.randint(0, 14, (2, 96, 96, 96), device=dev)
    times = []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(6):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = net(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    assert logits.shape == (2, 14, 96, 96, 96) and torch.isfinite(loss)
    enc = sum(p.numel() for p in net.encoder.parameters())
    total = sum(p.numel() for p in net.parameters())
    print("base seg net:", json.dumps({"encoder_params": enc, "total_params": total,
                                       "step_s_median": sorted(times[1:])[len(times[1:]) // 2],
                                       "peak_gib": torch.cuda.max_memory_allocated() / 2**30}))


def test_sample_ct_finetune_on_cuda(seg_dataset, tmp_path):
    from mim_scale.finetune.train import finetune

    summary = finetune(seg_dataset, "scratch", tmp_path / "run", recipe="sample_ct", model_config="tiny",
                       overrides=["train.device=\"cuda\""], log=lambda m: None)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["device"].startswith("cuda")
    dice = summary["validation"]["per_class_dice"]
    print("cuda sample-CT Dice:", json.dumps(dice))
    assert dice["liver"] > 0.5
