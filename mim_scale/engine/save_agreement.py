"""The save/stop decision every rank agrees on at a step boundary.

Saves come every ``train.checkpoint_every`` steps, every ``train.checkpoint_minutes``, on SIGTERM, on an
operator's stop request and at the last step. A timer or a signal fires on one rank only and the save is
collective, so each step the ranks all-reduce (MAX) a small flag vector before deciding; the same vector
carries "some rank saw a non-finite loss".
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass

import torch

from mim_scale.config import Config
from mim_scale.engine.collectives import agree_max


class StopFlags:
    """SIGTERM sets a flag (on whichever rank receives it); the ranks agree on it at the next step."""

    def __init__(self):
        self.sigterm = False
        try:
            signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not in the main thread (some launchers): no signal-driven save
            pass

    def _on_sigterm(self, *_):
        self.sigterm = True


@dataclass(frozen=True)
class Decision:
    save: bool  # every rank saves a checkpoint after this step
    stop: bool  # ... and then the run ends (SIGTERM or a stop request on some rank)
    nonfinite: bool  # some rank's losses were NaN or +-Inf: the run fails after recording the step


class SaveAgreement:
    """Decides, identically on every rank, whether to save after a step. ``stop_requested``: the reporter's
    check for an operator's stop request (``mim-scale stop``)."""

    def __init__(self, cfg: Config, stop_requested):
        self.cfg = cfg
        self.stop_requested = stop_requested
        self.flags = StopFlags()
        self.last_save = time.monotonic()

    def decide(self, step: int, losses: dict[str, float], device: torch.device) -> Decision:
        t = self.cfg.train
        due_time = t.checkpoint_minutes > 0 and time.monotonic() - self.last_save >= 60 * t.checkpoint_minutes
        agreed = agree_max([float(due_time), float(self.flags.sigterm or self.stop_requested()),
                            float(not all(map(math.isfinite, losses.values())))], device)
        due_steps = bool(t.checkpoint_every) and step % t.checkpoint_every == 0
        return Decision(save=due_steps or agreed[0] > 0 or agreed[1] > 0 or step == t.steps, stop=agreed[1] > 0,
                        nonfinite=agreed[2] > 0)

    def saved(self) -> None:
        self.last_save = time.monotonic()
