"""Prometheus metrics of one training worker (:class:`TrainMetrics`).

Every training worker owns one :class:`TrainMetrics`: its own ``CollectorRegistry`` (so several can live
in one process, as in tests) served on its own ``/metrics`` HTTP endpoint. The launcher writes the
endpoints into a Prometheus ``file_sd`` targets file (:func:`write_file_sd`), so one Prometheus finds a
whole cluster (``launcher/monitoring/prometheus.yml``).

Exposed series (labels: ``run`` and ``rank`` on every series; ``level`` and ``reason`` where noted).
Names follow Prometheus conventions: prefix ``mim_``, base units (seconds, bytes, ratios 0-1), ``_total``
only on counters.

==========================================  =========  ==========================================================
name                                        type       meaning
==========================================  =========  ==========================================================
mim_step                                    gauge      optimizer step the worker last finished
mim_steps_total                             counter    steps finished by this process
mim_last_step_timestamp_seconds             gauge      unix time of the last finished step (construction time
                                                       before the first step); the stall alert reads it
mim_step_duration_seconds                   histogram  wall time of one step, *including* the data wait
mim_data_wait_seconds_total                 counter    part of the step time spent waiting for the batch;
                                                       data-wait fraction = rate(this) /
                                                       rate(mim_step_duration_seconds_sum)
mim_crops_total                             counter    crops trained on (each yields every level's views)
mim_volumes_total                           counter    volume reads those crops came from
mim_views_total                             counter    masked views (all levels) through the model
mim_tokens_total                            counter    visible tokens through the encoder's transformer
mim_loss{level="1"|"2"|"3"}                 gauge      reconstruction loss per level (rec_l1..rec_l3)
mim_alignment_loss{level="1-2"|"2-3"}       gauge      cross-level alignment loss; the level *pair* goes in the
                                                       ``level`` label (align_12 -> "1-2") so the label set
                                                       stays run/rank/level/reason
mim_objective_loss                          gauge      the weighted total loss that is optimised
mim_nonfinite_losses_total                  counter    steps whose losses contained NaN or +-Inf
mim_learning_rate                           gauge      learning rate of the step
mim_grad_norm                               gauge      global gradient norm (only set when the engine has it)
mim_mfu                                     gauge      model FLOPs utilisation, 0-1 (only when known)
mim_collapse_std{level=...}                 gauge      std of the aligned embeddings per level pair ("1-2", from
                                                       the model's z_std_12) or level: near 0 means collapse
mim_checkpoint_duration_seconds             histogram  time to write one checkpoint
mim_checkpoint_written_bytes_total          counter    bytes written by checkpoints
mim_last_checkpoint_timestamp_seconds       gauge      unix time of the last finished checkpoint
mim_restarts_total                          counter    restarts of the run so far (see below)
mim_corrupt_samples_skipped_total{reason}   counter    samples skipped because they could not be decoded
mim_device_memory_peak_bytes                gauge      CUDA max allocated bytes, or the process's peak RSS on CPU
mim_validation_loss{level="1"|"2"|"3",      gauge      masked reconstruction loss per level on the run's fixed
  set="held-out"|"seen"}                               validation set (train.validate_every; same on every rank);
                                                       held-out = volumes never trained on (data.validation_shards)
mim_validation_alignment_loss{level=,set=}  gauge      alignment loss on that set, per level pair
mim_validation_step                         gauge      step of the last validation
==========================================  =========  ==========================================================

Restarts. A restarted worker is a new process whose counters start again from zero, so the count of
restarts cannot live in the process: the engine keeps it in its checkpoint metadata and, on start,
calls :meth:`TrainMetrics.set_restarts` with it (the launcher's failure handler bumps it). The alert
``MimRunRestarted`` then reads ``changes(max by (run) (mim_restarts_total)[15m:1m]) > 0``: aggregating
by run first joins the old process's series with the new one's, even when the new process got a
different ``instance`` (an ephemeral port or another node).

DataLoader worker processes. Volume reads and undecodable samples reach the main process stamped on each
crop's ``meta`` (``crop_index``, the loader worker's running ``corrupt`` count); the training step counts
them there (:mod:`mim_scale.engine.step`), so no queue or Prometheus multiprocess mode is needed.
"""

from __future__ import annotations

import logging
import math
import re
import resource
import sys
import time
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mim_scale.metrics.serve import MetricsServer, port_for_rank, resolve_addr, serve_registry, target_for

log = logging.getLogger(__name__)

# Loss keys of the model's forward() (ARCHITECTURE.md, "Model step") -> label values.
REC_LOSS_LEVELS = {"rec_l1": "1", "rec_l2": "2", "rec_l3": "3"}
ALIGN_LOSS_PAIRS = {"align_12": "1-2", "align_23": "2-3"}
TOTAL_LOSS_KEY = "total"

# Step times range from ~50 ms (tiny CPU runs) to minutes (huge model, many accumulation steps).
STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, float("inf"))
CHECKPOINT_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, float("inf"))


# --------------------------------------------------------------------------------------------------
# Training worker metrics


def _level_label(key: str) -> str:
    """``"level1"``, ``"l1"``, ``"1"`` -> ``"1"``; a level pair ``"z_std_12"``, ``"align_23"`` -> ``"2-3"``."""
    m = re.search(r"(\d+)$", str(key))
    if not m:
        return str(key)
    digits = m.group(1)
    return f"{digits[0]}-{digits[1]}" if len(digits) == 2 else digits


def peak_memory_bytes() -> int:
    """CUDA max allocated bytes when a CUDA device is in use, else the process's peak RSS."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return int(rss_kib) * 1024


class TrainMetrics:
    """Metrics of one training worker, served on its own ``/metrics`` endpoint.

    run: run name (a label on every series); rank: global rank (>= 0).
    addr, port: bind address and port of the endpoint; ``port=0`` binds an ephemeral port (see
    :attr:`port`). serve: ``False`` keeps the registry without an HTTP server (tests, disabled metrics).
    """

    def __init__(
        self,
        run: str,
        rank: int,
        *,
        addr: str = "127.0.0.1",
        port: int = 0,
        serve: bool = True,
    ) -> None:
        if not isinstance(run, str) or not run:
            raise ValueError(f"run must be a non-empty string, got {run!r}")
        if not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank must be an int >= 0, got {rank!r}")
        self.run = run
        self.rank = rank
        self.registry = CollectorRegistry(auto_describe=True)
        base = ("run", "rank")
        r = self.registry

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, base + extra, registry=r)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, base + extra, registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, base, buckets=buckets, registry=r)

        self._step = gauge("mim_step", "Optimizer step the worker last finished.")
        self._steps = counter("mim_steps", "Steps finished by this process.")
        self._last_step_ts = gauge(
            "mim_last_step_timestamp_seconds", "Unix time of the last finished step (start time before the first)."
        )
        self._step_seconds = histogram("mim_step_duration_seconds", "Wall time of one step, including the data wait.",
                                       STEP_BUCKETS)
        self._data_wait = counter("mim_data_wait_seconds", "Step time spent waiting for the next batch.")
        self._crops = counter("mim_crops", "Crops trained on (each yields every level's views).")
        self._volumes = counter("mim_volumes", "Volume reads the trained crops came from.")
        self._views = counter("mim_views", "Masked views (all levels) through the model.")
        self._tokens = counter("mim_tokens", "Visible tokens through the encoder's transformer.")
        self._loss = gauge("mim_loss", "Reconstruction loss per level.", ("level",))
        self._align = gauge("mim_alignment_loss", "Cross-level alignment loss; level holds the pair, e.g. 1-2.", ("level",))
        self._objective = gauge("mim_objective_loss", "Weighted total loss that is optimised.")
        self._nonfinite = counter("mim_nonfinite_losses", "Steps whose losses contained NaN or Inf.")
        self._lr = gauge("mim_learning_rate", "Learning rate of the last step.")
        self._grad_norm = gauge("mim_grad_norm", "Global gradient norm of the last step.")
        self._mfu = gauge("mim_mfu", "Model FLOPs utilisation (0-1) of the last step.")
        self._collapse = gauge("mim_collapse_std", "Std of normalised embeddings per level; near 0 = collapse.", ("level",))
        self._ckpt_seconds = histogram("mim_checkpoint_duration_seconds", "Time to write one checkpoint.",
                                       CHECKPOINT_BUCKETS)
        self._ckpt_bytes = counter("mim_checkpoint_written_bytes", "Bytes written by checkpoints.")
        self._last_ckpt_ts = gauge("mim_last_checkpoint_timestamp_seconds", "Unix time of the last finished checkpoint.")
        self._restarts = counter("mim_restarts", "Restarts of the run so far (kept in the checkpoint metadata).")
        self._corrupt = counter("mim_corrupt_samples_skipped", "Samples skipped because they could not be decoded.", ("reason",))
        self._memory = gauge("mim_device_memory_peak_bytes", "CUDA max allocated bytes, or peak process RSS on CPU.")
        self._val_loss = gauge("mim_validation_loss", "Masked reconstruction loss per level on the run's fixed validation "
                               "set; set is held-out (volumes never trained on) or seen.", ("level", "set"))
        self._val_align = gauge("mim_validation_alignment_loss", "Alignment loss on the fixed validation set; level holds "
                                "the pair; set is held-out or seen.", ("level", "set"))
        self._val_step = gauge("mim_validation_step", "Step of the last validation.")

        self._lv = {"run": run, "rank": str(rank)}
        # Counters exist (at 0) from the first scrape so rate()/increase() see the first increment;
        # gauges whose 0 would be a lie (losses, lr, mfu) appear with the first step.
        for m in (
            self._steps, self._step_seconds, self._data_wait, self._crops, self._volumes, self._views, self._tokens,
            self._nonfinite, self._ckpt_seconds, self._ckpt_bytes, self._restarts,
        ):  # fmt: skip
            m.labels(**self._lv)
        self._last_step_ts.labels(**self._lv).set(time.time())
        self.record_device_memory()
        self._restart_count = 0
        self._warned_mfu = False

        self.addr = addr
        self._server: MetricsServer | None = None
        self.port: int | None = None
        if serve:
            self._server, self.port = serve_registry(self.registry, addr, port)

    @classmethod
    def from_config(cls, metrics_cfg, run: str, rank: int, node_ip: str | None = None, **kwargs) -> TrainMetrics:
        """From ``Config.metrics``: bind ``resolve_addr(metrics_cfg.addr, node_ip)`` on
        ``port_for_rank(metrics_cfg.port, rank)``."""
        return cls(run, rank, addr=resolve_addr(metrics_cfg.addr, node_ip), port=port_for_rank(metrics_cfg.port, rank),
                   **kwargs)

    # -- properties ---------------------------------------------------------------------------------

    @property
    def target(self) -> str:
        """``host:port`` to put into the file_sd targets file."""
        if self.port is None:
            raise RuntimeError("TrainMetrics was created with serve=False: there is no endpoint")
        return target_for(self.addr, self.port)

    # -- recording ----------------------------------------------------------------------------------

    def record_step(
        self,
        step: int,
        step_seconds: float,
        data_wait_seconds: float,
        crops: int,
        volumes: int,
        tokens: int,
        losses: Mapping[str, float],
        lr: float,
        grad_norm: float | None = None,
        mfu: float | None = None,
        collapse_std: Mapping[str, float] | None = None,
        views: int = 0,
    ) -> None:
        """Record one finished optimizer step.

        step_seconds: wall time of the whole step, *including* the ``data_wait_seconds`` spent waiting
        for the batch (so their ratio is the data-wait fraction). losses: the model's loss dict
        (``rec_l1``.. ``rec_l3``, ``align_12``, ``align_23``, ``total``; missing keys keep their last
        value). The model's other outputs may be passed along: ``z_std_12`` / ``z_std_23`` feed
        ``mim_collapse_std`` when ``collapse_std`` is None, other keys (``tokens``, ``views``) are
        ignored. Values may be floats or 0-d tensors. mfu: 0-1. collapse_std: ``{"z_std_12": s}``,
        ``{"level1": s}``, ... (the label is the level or level pair, see :func:`_level_label`).
        crops, volumes, views, tokens: this rank's counts in the step, each in its own unit (crops trained on,
        volume reads they came from, masked views through the model, visible tokens through the transformer).
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if not (step_seconds >= 0 and data_wait_seconds >= 0):
            raise ValueError(f"step_seconds and data_wait_seconds must be >= 0, got {step_seconds}, {data_wait_seconds}")
        if data_wait_seconds > step_seconds * (1 + 1e-6) + 1e-6:
            raise ValueError(
                f"data_wait_seconds ({data_wait_seconds}) exceeds step_seconds ({step_seconds}): "
                "step_seconds must include the wait for the batch"
            )
        if min(crops, volumes, tokens, views) < 0:
            raise ValueError(f"crops, volumes, tokens, views must be >= 0, got {crops}, {volumes}, {tokens}, {views}")
        if mfu is not None:
            if not float(mfu) >= 0.0:
                raise ValueError(f"mfu is a fraction >= 0, got {mfu}")
            if float(mfu) > 1.0 and not self._warned_mfu:
                # exported anyway: a dashboard showing >100% points at a wrong FLOPs count or peak
                log.warning("rank %d: MFU %.3f > 1: the FLOPs count or the device peak is wrong", self.rank, mfu)
                self._warned_mfu = True
        loss_keys = set(REC_LOSS_LEVELS) | set(ALIGN_LOSS_PAIRS) | {TOTAL_LOSS_KEY}
        if collapse_std is None:
            collapse_std = {k: float(v) for k, v in losses.items() if k.startswith("z_std_")}

        lv = self._lv
        values = {k: float(v) for k, v in losses.items() if k in loss_keys}
        for key, level in REC_LOSS_LEVELS.items():
            if key in values:
                self._loss.labels(level=level, **lv).set(values[key])
        for key, pair in ALIGN_LOSS_PAIRS.items():
            if key in values:
                self._align.labels(level=pair, **lv).set(values[key])
        if TOTAL_LOSS_KEY in values:
            self._objective.labels(**lv).set(values[TOTAL_LOSS_KEY])
        if not all(math.isfinite(v) for v in values.values()):
            self._nonfinite.labels(**lv).inc()

        self._step.labels(**lv).set(step)
        self._steps.labels(**lv).inc()
        self._last_step_ts.labels(**lv).set(time.time())
        self._step_seconds.labels(**lv).observe(step_seconds)
        self._data_wait.labels(**lv).inc(data_wait_seconds)
        self._crops.labels(**lv).inc(crops)
        self._views.labels(**lv).inc(views)
        self._volumes.labels(**lv).inc(volumes)
        self._tokens.labels(**lv).inc(tokens)
        self._lr.labels(**lv).set(float(lr))
        if grad_norm is not None:
            self._grad_norm.labels(**lv).set(float(grad_norm))
        if mfu is not None:
            self._mfu.labels(**lv).set(float(mfu))
        for key, std in (collapse_std or {}).items():
            self._collapse.labels(level=_level_label(key), **lv).set(float(std))

    def record_validation(self, step: int, losses: Mapping[str, float], source: str = "seen") -> None:
        """Record the validation losses of ``step``: ``{"val_rec_l1": x, ..., "val_align_12": y, ...}``
        (the keys :func:`mim_scale.model.validation.validation_losses` returns; others are ignored). ``source``:
        "held-out" (volumes never trained on) or "seen" (crops of training volumes), the ``set`` label."""
        lv = self._lv
        for key, value in losses.items():
            name = key[4:] if key.startswith("val_") else key
            if name in REC_LOSS_LEVELS:
                self._val_loss.labels(level=REC_LOSS_LEVELS[name], set=source, **lv).set(float(value))
            elif name in ALIGN_LOSS_PAIRS:
                self._val_align.labels(level=ALIGN_LOSS_PAIRS[name], set=source, **lv).set(float(value))
        self._val_step.labels(**lv).set(step)

    def record_checkpoint(self, seconds: float, nbytes: int) -> None:
        """One checkpoint written in ``seconds``, ``nbytes`` on disk (this rank's share)."""
        if seconds < 0 or nbytes < 0:
            raise ValueError(f"checkpoint seconds and bytes must be >= 0, got {seconds}, {nbytes}")
        self._ckpt_seconds.labels(**self._lv).observe(seconds)
        self._ckpt_bytes.labels(**self._lv).inc(nbytes)
        self._last_ckpt_ts.labels(**self._lv).set(time.time())

    def set_restarts(self, n: int) -> None:
        """Set the run's restart count (from the checkpoint metadata) when the process starts.

        Monotonic like any counter: a smaller ``n`` than already recorded is an error.
        """
        if n < self._restart_count:
            raise ValueError(f"restart count cannot go down: {self._restart_count} -> {n}")
        self._restarts.labels(**self._lv).inc(n - self._restart_count)
        self._restart_count = n

    def record_restart(self) -> int:
        """Count one more restart (an in-process recovery); returns the new count."""
        self.set_restarts(self._restart_count + 1)
        return self._restart_count

    @property
    def restarts(self) -> int:
        return self._restart_count

    def record_corrupt_skipped(self, n: int, shard: str, reason: str = "decode_error") -> None:
        """``n`` samples of ``shard`` skipped; the shard is logged (too many values for a label)."""
        if n < 0:
            raise ValueError(f"skipped count must be >= 0, got {n}")
        if n:
            log.warning("rank %d skipped %d corrupt sample(s) in %s (%s)", self.rank, n, shard, reason)
        self._corrupt.labels(reason=reason, **self._lv).inc(n)

    def record_device_memory(self) -> int:
        """Update and return the peak device memory (CUDA max allocated, or peak RSS on CPU)."""
        value = peak_memory_bytes()
        self._memory.labels(**self._lv).set(value)
        return value

    # -- lifecycle ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the endpoint (idempotent)."""
        if self._server is not None:
            self._server.close()
            self._server = None

    def __enter__(self) -> TrainMetrics:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def sample(self, name: str, **labels: str) -> float | None:
        """Current value of one exposed sample (e.g. ``"mim_steps_total"``), for tests and reports."""
        return self.registry.get_sample_value(name, {**self._lv, **labels})
