"""``mim-scale pretrain ... --rehearse``: the whole cluster path, end to end, before the real run costs anything.

On the cluster the command names (a local one by default), with the command's own config, workers and storage:

    plan         the recipe the workers will resolve (``mim_scale.plan``), the elastic range checked
    train        a few optimizer steps (``--rehearse-steps``, default 4) with a checkpoint every 2 steps
    kill-resume  one worker SIGKILLed at the first step after a checkpoint; Ray restarts the group, which resumes
                 from that checkpoint (restart count in the checkpoint and the metrics) and finishes
    checkpoint   the last step's checkpoint is committed (Ray's list) in the run's storage
    driver-files history, worker records and every rank's metrics target reached the driver's run folder, and
                 each target names the address its worker was told to bind (metrics.addr)
    metrics      every rank's /metrics scraped once while it ran (mim_step present)
    export       ``mim-scale export`` of that checkpoint, loaded back strictly
    throughput   crops/s and data-wait fraction measured on the steps after the resume, and the full run
                 projected from them through ``mim_scale.plan`` (wall hours, device-hours, cost at
                 ``--price-per-device-hour``)

One verdict line per stage (``ok``, ``FAIL``, or ``skipped`` after a failure it depends on), exit status 1 when
any stage failed. Everything the rehearsal writes goes into one folder of the run's storage,
``STORAGE/NAME-rehearsal-<UTC time>`` (and ``./runs/<that>`` beside the driver for object-store storage); the
run itself (``STORAGE/NAME``) is not touched. ``MIM_SCALE_REHEARSE_BREAK=STAGE`` (or ``--rehearse-break``) makes
that stage fail, to see the failure path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mim_scale import rundir
from mim_scale.config import Config

STAGES = ("plan", "train", "kill-resume", "checkpoint", "driver-files", "metrics", "export", "throughput")
# what each stage needs to have passed before it can say anything
NEEDS = {"train": ("plan",), "kill-resume": ("train",), "checkpoint": ("train",), "driver-files": ("train",),
         "metrics": ("train",), "export": ("checkpoint",), "throughput": ("train",)}
CHECKPOINT_EVERY = 2


class StageFailed(Exception):
    """A stage's check did not hold; the message says what was seen."""


@dataclasses.dataclass
class Rehearsal:
    cfg: Config  # the real run's config
    steps: int = 4
    price_per_device_hour: float | None = None
    break_stage: str | None = None
    out: Callable[[str], None] = print
    init: Path | None = None  # --init, as the real run would start
    env: dict[str, str] | None = None  # --env, as the real run gets
    verdicts: dict[str, str] = dataclasses.field(default_factory=dict)
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------------------------------------------------

    def run(self) -> int:
        if self.break_stage is not None and self.break_stage not in STAGES:
            raise ValueError(f"--rehearse-break {self.break_stage!r}: one of {', '.join(STAGES)}")
        if self.steps < CHECKPOINT_EVERY + 2:
            raise ValueError(f"--rehearse-steps {self.steps}: at least {CHECKPOINT_EVERY + 2} (a checkpoint, a kill "
                             "after it, and a step after the resume)")
        for stage in STAGES:
            failed_needs = [n for n in NEEDS.get(stage, ()) if self.verdicts.get(n) != "ok"]
            if failed_needs:
                self._say(stage, "skipped", f"needs {', '.join(failed_needs)}")
                continue
            try:
                if stage == self.break_stage:
                    raise StageFailed("broken on purpose (--rehearse-break / MIM_SCALE_REHEARSE_BREAK)")
                detail = getattr(self, "_" + stage.replace("-", "_"))()
            except Exception as exc:  # noqa: BLE001 - every failure becomes that stage's verdict
                self._say(stage, "FAIL", f"{type(exc).__name__}: {exc}" if not isinstance(exc, StageFailed) else str(exc))
            else:
                self._say(stage, "ok", detail)
        failed = [s for s, v in self.verdicts.items() if v == "FAIL"]
        folder = self.facts.get("folder")
        wrote = f"everything it wrote is in {folder}" if folder and "train" in self.verdicts and \
            self.verdicts["train"] != "skipped" else "it wrote nothing"
        self.out(f"rehearsal: {'FAILED (' + ', '.join(failed) + ')' if failed else 'PASSED'}; {wrote}")
        return 1 if failed else 0

    def _say(self, stage: str, verdict: str, detail: str) -> None:
        self.verdicts[stage] = verdict
        self.out(f"rehearse {stage:<12} {verdict:<7} {detail}")

    # -- stages ----------------------------------------------------------------------------------------

    def _plan(self) -> str:
        from mim_scale.launcher.elastic import check_elastic
        from mim_scale.launcher.ray_train import run_name, storage_root
        from mim_scale.plan import make_plan

        check_elastic(self.cfg)
        plan = make_plan(self.cfg)
        self.facts["plan"] = plan
        r = plan.recipe
        name = f"{run_name(self.cfg)}{rundir.REHEARSAL_SUFFIX}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        storage = storage_root(self.cfg)
        self.facts["name"], self.facts["storage"] = name, storage
        self.facts["folder"] = f"{storage.rstrip('/')}/{name}" if "://" in storage else str(Path(storage) / name)
        return (f"{r.workers} workers x {r.micro_batch_crops} crop(s) x {r.grad_accum} accumulation = "
                f"{r.crops_per_step} crops per step, peak lr {r.peak_lr:.3g}; rehearsal folder {self.facts['folder']}")

    def _train(self) -> str:
        from mim_scale.launcher.ray_train import pretrain

        workers = self.cfg.launch.workers
        kill = f"kill:{workers - 1}:{CHECKPOINT_EVERY + 1}"
        self.facts["kill"] = kill
        cfg = self.cfg.replace({"launch.name": self.facts["name"], "launch.min_workers": 0,
                                "train.steps": self.steps, "train.checkpoint_every": CHECKPOINT_EVERY,
                                "train.checkpoint_minutes": 0.0, "train.log_every": 1,
                                "launch.max_failures": max(1, self.cfg.launch.max_failures),
                                "metrics.enabled": True, "metrics.linger_seconds": max(5.0, self.cfg.metrics.linger_seconds)})
        run_dir = _driver_run_dir(self.facts["storage"], self.facts["name"])
        scraper = _Scraper(run_dir)
        scraper.start()
        try:
            result = pretrain(cfg, fault=kill, init=self.init, env=self.env)
        finally:
            scraper.stop()
        self.facts.update(result=result, run_dir=result.run_dir, scraped=scraper.seen)
        if result.error is not None:
            raise StageFailed(f"the run failed: {result.error}")
        step = result.metrics.get("step")
        if step != self.steps:
            raise StageFailed(f"the run ended at step {step}, not {self.steps}")
        return f"{self.steps} steps on {workers} workers in {result.seconds:.0f} s (Ray start-up and one restart included)"

    def _kill_resume(self) -> str:
        from mim_scale.engine.checkpoint import STATE_FILE
        from mim_scale.launcher.runs import _read_json, committed_checkpoint

        ckpt = committed_checkpoint(self.facts["folder"])
        state = _read_json(f"{ckpt.rstrip('/')}/{STATE_FILE}") if ckpt else None
        restarts = (state or {}).get("restarts", 0)
        steps = [h["step"] for h in _history(self.facts["run_dir"])]
        starts = int(rundir.RunFiles(self.facts["run_dir"]).read_text(rundir.ATTEMPTS_FILE) or 0)
        if not restarts or starts < 2:
            raise StageFailed(f"{self.facts['kill']} was injected but the last checkpoint records {restarts} restarts "
                              f"and the workers started {starts} time(s)")
        if steps[-1:] != [self.steps]:
            raise StageFailed(f"history ends at {steps[-1:] or 'nothing'}, not step {self.steps}")
        return (f"rank {self.facts['kill'].split(':')[1]} SIGKILLed at step {CHECKPOINT_EVERY + 1}; the group restarted "
                f"from the step-{CHECKPOINT_EVERY} checkpoint (restarts {restarts}) and reached step {self.steps}")

    def _checkpoint(self) -> str:
        from mim_scale.engine.checkpoint import STATE_FILE
        from mim_scale.launcher.runs import _read_json, committed_checkpoint

        ckpt = committed_checkpoint(self.facts["folder"])
        if ckpt is None:
            raise StageFailed(f"no committed checkpoint in {self.facts['folder']}")
        state = _read_json(f"{ckpt.rstrip('/')}/{STATE_FILE}") or {}
        if state.get("step") != self.steps:
            raise StageFailed(f"{ckpt}: step {state.get('step')}, not {self.steps}")
        self.facts["checkpoint"] = ckpt
        return f"step {self.steps} committed: {ckpt}"

    def _driver_files(self) -> str:
        run_dir = Path(self.facts["run_dir"])
        world = self.cfg.launch.workers
        files = rundir.RunFiles(run_dir)
        problems, addrs = [], []
        for rank in range(world):
            record = json.loads(files.read_text(rundir.worker_record(rank)) or "null")
            targets = json.loads(files.read_text(rundir.targets_file(rank)) or "null")
            if record is None:
                problems.append(f"no {rundir.worker_record(rank)}")
            if not targets:
                problems.append(f"no {rundir.targets_file(rank)}")
                continue
            target = targets[0]["targets"][0]
            addrs.append(target)
            expected = _expected_addr(self.cfg, (record or {}).get("node_ip"))
            if expected is not None and not target.startswith(f"{expected}:"):
                problems.append(f"rank {rank}'s target {target} does not name its node's address {expected}")
        if not _history(run_dir):
            problems.append(f"no {rundir.HISTORY_FILE}")
        if problems:
            raise StageFailed("; ".join(problems))
        return f"history, {world} worker records and targets in {run_dir}: {', '.join(addrs)}"

    def _metrics(self) -> str:
        seen = self.facts.get("scraped", {})
        missing = [r for r in range(self.cfg.launch.workers) if r not in seen]
        if missing:
            raise StageFailed(f"rank(s) {missing} never answered on /metrics (scraped: {sorted(seen)})")
        return "scraped once each: " + ", ".join(f"rank {r} {t} mim_step={v:g}" for r, (t, v) in sorted(seen.items()))

    def _export(self) -> str:
        import tempfile

        from mim_scale.export import export_run, load_encoder

        ckpt = self.facts["checkpoint"]
        out = f"{self.facts['folder'].rstrip('/')}/export" if "://" in self.facts["folder"] else str(Path(self.facts["folder"]) / "export")
        with tempfile.TemporaryDirectory(prefix="mim-rehearse-") as tmp:
            source = Path(ckpt)
            if "://" in ckpt:  # export reads a local checkpoint folder: fetch the committed one
                import pyarrow.fs as pafs

                source = Path(tmp) / "checkpoint"
                pafs.copy_files(ckpt, str(source))
            export_run(source, out)
        encoder, _ = load_encoder(out)  # strict: every key and shape of the configured encoder
        params = sum(p.numel() for p in encoder.parameters())
        return f"{out} ({params:,} encoder parameters, loaded back strictly)"

    def _throughput(self) -> str:
        from mim_scale.plan import make_plan

        history = _history(self.facts["run_dir"])
        # leave out the first step of each start (start-up, first allocation): step 1, and the step after the resume
        lines = [h for h in history if h["step"] not in (1, CHECKPOINT_EVERY + 1)] or history
        step_s = statistics.median(h["step_seconds"] for h in lines)
        wait_s = statistics.median(h.get("data_wait_seconds", 0.0) for h in lines)
        crops_per_step = self.facts["plan"].recipe.crops_per_step
        group_rate = crops_per_step / step_s
        workers = self.cfg.launch.workers
        plan = dataclasses.replace(make_plan(self.cfg), throughput={"crops_per_s": group_rate / workers,
                                                                    "source": "this rehearsal"})
        self.facts["crops_per_s"], self.facts["data_wait_fraction"] = group_rate, wait_s / step_s
        text = (f"{group_rate:.3g} crops/s on {workers} workers ({step_s:.2f} s/step, median of {len(lines)}), data wait "
                f"{100 * wait_s / step_s:.0f}% of the step")
        if plan.wall_hours is not None:
            text += (f"; the full run ({plan.recipe.total_steps:,} steps) projected at {_num(plan.wall_hours)} h wall = "
                     f"{_num(plan.device_hours)} device-hours")
            if self.price_per_device_hour:
                text += (f" = {_num(plan.device_hours * self.price_per_device_hour)} at "
                         f"{self.price_per_device_hour:g} per device-hour")
        else:
            text += "; no projection: the config's step count needs the training volume count (data.shards' manifest)"
        return text


# ---------------------------------------------------------------------------------------------------------


def _num(x: float) -> str:
    """Three significant figures, thousands separated: 0.00412, 3.7, 1,250."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _driver_run_dir(storage: str, name: str) -> Path:
    """Where the driver keeps the run folder (as ``pretrain`` does): STORAGE/NAME, or ./runs/NAME for a URI."""
    return Path(storage) / name if "://" not in storage else Path("runs").resolve() / name


def _history(run_dir: Path) -> list[dict]:
    """The run's history in the driver's run folder, the last record of each step (a restart repeats steps)."""
    from mim_scale.report import read_history

    return read_history(run_dir) if (Path(run_dir) / rundir.HISTORY_FILE).is_file() else []


def _expected_addr(cfg: Config, node_ip: str | None) -> str | None:
    from mim_scale.metrics import resolve_addr, target_for

    addr = resolve_addr(cfg.metrics.addr, node_ip if cfg.launch.address else None)
    return target_for(addr, 1).rsplit(":", 1)[0]


class _Scraper(threading.Thread):
    """Scrapes each rank's /metrics once, from the targets that reach the driver's run folder, while the run goes."""

    def __init__(self, run_dir: Path, every: float = 0.5):
        super().__init__(daemon=True, name="mim-rehearse-scraper")
        self.run_dir, self.every = Path(run_dir), every
        self.seen: dict[int, tuple[str, float]] = {}
        self._done = threading.Event()

    def run(self) -> None:
        from mim_scale.launcher.runs import _probe

        while not self._done.wait(self.every):
            for path in (self.run_dir / rundir.TARGETS_DIR).glob("rank-*.json"):
                rank = rundir.rank_of(path.name)
                if rank is None or rank in self.seen:
                    continue
                try:
                    target = json.loads(path.read_text())[0]["targets"][0]
                except (OSError, ValueError, KeyError, IndexError):
                    continue  # being replaced
                found = _probe(target)
                if found and found.get("mim_step") is not None:
                    self.seen[rank] = (target, found["mim_step"])

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=10)


def rehearse(cfg: Config, *, steps: int = 4, price_per_device_hour: float | None = None,
             break_stage: str | None = None, out: Callable[[str], None] = print, init: Path | None = None,
             env: dict[str, str] | None = None) -> int:
    """Run the rehearsal of ``cfg`` (see the module doc); returns the exit status (0 passed, 1 a stage failed)."""
    return Rehearsal(cfg, steps=steps, price_per_device_hour=price_per_device_hour,
                     break_stage=break_stage or os.environ.get("MIM_SCALE_REHEARSE_BREAK") or None, out=out,
                     init=init, env=env).run()
