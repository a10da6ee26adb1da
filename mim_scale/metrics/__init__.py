"""Metrics: the only copies of what training, the launcher and the monitor measure and serve.

- :mod:`.train`: :class:`TrainMetrics`, one training worker's Prometheus series (the table of names is there).
- :mod:`.mfu`: the one table of device peak FLOP/s, and MFU.
- :mod:`.serve`: serving a registry on ``/metrics``; the address a worker binds and the target it is scraped at.
- :mod:`.file_sd`: Prometheus ``file_sd`` files (how one Prometheus finds every worker of a run).
"""

from mim_scale.metrics.file_sd import file_sd_text, read_file_sd, write_file_sd, write_file_sd_groups
from mim_scale.metrics.mfu import PEAK_FLOPS, compute_mfu, device_peak_flops, run_peak_flops
from mim_scale.metrics.serve import MetricsServer, port_for_rank, resolve_addr, serve_registry, target_for
from mim_scale.metrics.train import (ALIGN_LOSS_PAIRS, REC_LOSS_LEVELS, TOTAL_LOSS_KEY, TrainMetrics,
                                     peak_memory_bytes)

__all__ = ["ALIGN_LOSS_PAIRS", "PEAK_FLOPS", "REC_LOSS_LEVELS", "TOTAL_LOSS_KEY", "MetricsServer",
           "TrainMetrics", "compute_mfu", "device_peak_flops", "file_sd_text", "peak_memory_bytes", "port_for_rank",
           "read_file_sd", "resolve_addr", "run_peak_flops", "serve_registry", "target_for", "write_file_sd",
           "write_file_sd_groups"]
