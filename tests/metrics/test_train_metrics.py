"""TrainMetrics without a Prometheus server: argument checks, restarts, the endpoint."""

from __future__ import annotations

import socket
import urllib.request

import pytest
import torch

from mim_scale.config import load_config
from mim_scale.metrics import (
    TrainMetrics,
    compute_mfu,
    device_peak_flops,
    port_for_rank,
    serve_registry,
    target_for,
)

GOOD = {"rec_l1": 1.0, "rec_l2": 1.0, "rec_l3": 1.0, "align_12": 0.1, "align_23": 0.1, "total": 3.2}


def test_record_step_checks_its_arguments():
    m = TrainMetrics("r", 0, serve=False)
    with pytest.raises(ValueError, match="must include the wait"):
        m.record_step(1, 0.1, 0.5, 1, 1, 1, GOOD, lr=1e-3)
    with pytest.raises(ValueError, match="mfu is a fraction"):
        m.record_step(1, 0.1, 0.0, 1, 1, 1, GOOD, lr=1e-3, mfu=float("nan"))
    with pytest.raises(ValueError, match="step must be >= 0"):
        m.record_step(-1, 0.1, 0.0, 1, 1, 1, GOOD, lr=1e-3)
    assert m.sample("mim_steps_total") == 0.0  # nothing half-recorded
    with pytest.raises(ValueError, match="rank must be an int >= 0"):
        TrainMetrics("r", -1, serve=False)
    with pytest.raises(ValueError, match="run must be a non-empty string"):
        TrainMetrics("", 0, serve=False)


def test_tensor_losses_histogram_and_collapse_levels():
    m = TrainMetrics("r", 3, serve=False)
    losses = {k: torch.tensor(v) for k, v in GOOD.items()}
    for step, secs in enumerate((0.07, 0.3, 7.0), start=1):
        m.record_step(step, secs, secs / 10, 2, 1, 100, losses, lr=1e-3, collapse_std={"level1": 0.5, "rec_l3": 0.1})
    assert m.sample("mim_step") == 3
    assert m.sample("mim_step_duration_seconds_count") == 3
    assert m.sample("mim_step_duration_seconds_bucket", le="0.1") == 1
    assert m.sample("mim_step_duration_seconds_bucket", le="10.0") == 3
    assert m.sample("mim_data_wait_seconds_total") == pytest.approx(0.737)
    assert m.sample("mim_tokens_total") == 300
    assert m.sample("mim_collapse_std", level="1") == 0.5
    assert m.sample("mim_collapse_std", level="3") == 0.1
    assert m.sample("mim_grad_norm") is None  # never given: absent, not a fake 0


def test_model_output_dict_can_be_passed_as_is():
    """forward() also returns monitors: z_std_* become collapse gauges, the rest is ignored."""
    m = TrainMetrics("r", 0, serve=False)
    out = {**GOOD, "z_std_12": 0.25, "z_std_23": 0.125, "tokens": 512.0, "views": 6.0}
    m.record_step(1, 0.1, 0.0, 1, 1, 512, {k: torch.tensor(v) for k, v in out.items()}, lr=1e-3)
    assert m.sample("mim_collapse_std", level="1-2") == 0.25
    assert m.sample("mim_collapse_std", level="2-3") == 0.125
    assert m.sample("mim_objective_loss") == pytest.approx(3.2)
    names = {s.name for metric in m.registry.collect() for s in metric.samples}
    assert {n for n in names if "token" in n or "view" in n} == {"mim_tokens_total", "mim_tokens_created",
                                                                 "mim_views_total", "mim_views_created"}
    assert m.sample("mim_views_total") == 0  # the dict's per-crop "views" is not a count of this step


def test_restart_count_is_monotonic():
    m = TrainMetrics("r", 0, serve=False)
    assert m.sample("mim_restarts_total") == 0.0
    m.set_restarts(2)  # from the checkpoint metadata
    assert m.record_restart() == 3
    assert m.sample("mim_restarts_total") == 3.0
    with pytest.raises(ValueError, match="cannot go down: 3 -> 1"):
        m.set_restarts(1)


def test_checkpoint_and_corrupt_counters(logged):
    caplog = logged("mim_scale.metrics.train")
    m = TrainMetrics("r", 0, serve=False)
    m.record_checkpoint(2.5, 10_000)
    m.record_checkpoint(1.0, 5_000)
    assert m.sample("mim_checkpoint_written_bytes_total") == 15_000
    assert m.sample("mim_checkpoint_duration_seconds_sum") == 3.5
    assert m.sample("mim_last_checkpoint_timestamp_seconds") > 1.6e9
    m.record_corrupt_skipped(2, "shards/train-000017.tar")
    assert m.sample("mim_corrupt_samples_skipped_total", reason="decode_error") == 2
    assert "train-000017.tar" in caplog.text  # the shard goes to the log, not to a label


def test_endpoint_serves_text_format_and_frees_its_port():
    m = TrainMetrics("run-x", 1, addr="127.0.0.1", port=0)
    m.record_step(5, 0.1, 0.01, 1, 1, 1, GOOD, lr=2e-4)
    body = urllib.request.urlopen(f"http://{m.target}/metrics", timeout=5).read().decode()
    assert 'mim_step{rank="1",run="run-x"} 5.0' in body
    assert 'mim_learning_rate{rank="1",run="run-x"} 0.0002' in body
    assert "# TYPE mim_steps_total counter" in body
    port = m.port
    m.close()
    m.close()  # idempotent
    with socket.socket() as s:
        # SO_REUSEADDR: the closed connection may linger in TIME_WAIT; a live listener still blocks bind
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # freed
        s.listen()


def test_busy_port_is_reported_with_the_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            TrainMetrics("r", 0, port=port)


def test_port_and_target_helpers():
    assert port_for_rank(0, 7) == 0
    assert port_for_rank(9400, 3) == 9403
    with pytest.raises(ValueError, match="outside"):
        port_for_rank(65535, 1)
    assert target_for("127.0.0.1", 9400) == "127.0.0.1:9400"
    assert target_for("0.0.0.0", 9400) == f"{socket.gethostname()}:9400"
    assert target_for("::1", 9400) == "[::1]:9400"
    from prometheus_client import CollectorRegistry, Gauge

    reg = CollectorRegistry()
    Gauge("mim_builder_probe", "x", registry=reg).set(1)
    server, port = serve_registry(reg)
    try:
        assert "mim_builder_probe 1.0" in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    finally:
        server.close()


def test_impossible_mfu_is_exported_with_a_warning(logged):
    caplog = logged("mim_scale.metrics.train")
    m = TrainMetrics("r", 0, serve=False)
    m.record_step(1, 0.1, 0.0, 1, 1, 1, GOOD, lr=1e-3, mfu=1.7)
    assert m.sample("mim_mfu") == 1.7
    assert "FLOPs count or the device peak is wrong" in caplog.text


def test_mfu_helpers_and_config():
    assert device_peak_flops("bf16", "NVIDIA H100 80GB HBM3") == 989.4e12
    assert device_peak_flops("bf16", "NVIDIA H100 PCIe") == 756e12
    assert device_peak_flops("fp32", "NVIDIA A100-SXM4-80GB") == 156e12
    assert device_peak_flops("bf16", "Some Future GPU") is None
    if not torch.cuda.is_available():
        assert device_peak_flops("bf16") is None  # CPU: MFU needs metrics.device_peak_flops
    with pytest.raises(ValueError, match="precision"):
        device_peak_flops("int8", "NVIDIA H100")
    assert compute_mfu(1e12, 4, 2.0, 4e12) == pytest.approx(0.5)
    assert compute_mfu(1e12, 4, 2.0, None) is None
    cfg = load_config("tiny")
    m = TrainMetrics.from_config(cfg.metrics, "r", 1, serve=False)
    assert m.rank == 1 and m.port is None
    assert m.addr == "127.0.0.1"  # metrics.addr "auto" without a Ray node: loopback
    assert TrainMetrics.from_config(cfg.metrics, "r", 1, node_ip="10.0.0.7", serve=False).addr == "10.0.0.7"


def test_validation_losses_per_level():
    m = TrainMetrics("r", 1, serve=False)
    assert m.sample("mim_validation_loss", level="1") is None  # no validation yet: absent, not 0
    m.record_validation(40, {"val_rec_l1": 0.9, "val_rec_l2": 0.8, "val_rec_l3": 0.7, "val_align_12": 0.3,
                             "val_align_23": 0.2, "val_total": 2.45})
    assert m.sample("mim_validation_loss", level="2", set="seen") == pytest.approx(0.8)
    assert m.sample("mim_validation_alignment_loss", level="2-3", set="seen") == pytest.approx(0.2)
    assert m.sample("mim_validation_step") == 40
    m.record_validation(50, {"val_rec_l1": 0.5}, source="held-out")
    assert m.sample("mim_validation_loss", level="1", set="held-out") == pytest.approx(0.5)


def test_run_peak_flops_prefers_the_configured_figure_then_the_one_table():
    import torch

    from mim_scale.metrics import run_peak_flops

    assert run_peak_flops(123e12, "bf16", torch.device("cpu")) == 123e12  # metrics.device_peak_flops wins
    assert run_peak_flops(0.0, "bf16", torch.device("cpu")) is None  # CPU: no MFU unless configured
    # the engine reports MFU through this and compute_mfu only (no second peak table anywhere)
    from pathlib import Path

    import mim_scale.engine as engine

    for module in Path(engine.__file__).parent.glob("*.py"):
        assert "989" not in module.read_text(), f"{module} has its own peak-FLOPs figures"
