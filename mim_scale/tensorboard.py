"""TensorBoard event files beside a run: ``RUN/tensorboard/``, read with ``tensorboard --logdir RUN/..``.

Written by the lead rank only (rank 0), when ``metrics.tensorboard`` is true (the default) and the
``tensorboard`` package is installed (``pip install 'mim-scale[tensorboard]'``); otherwise nothing is
written and training is unchanged. Prometheus stays the operators' live view; this is the researchers'.

Tags (pre-training, :meth:`Board.step` of the loop's per-step record):

- ``loss/rec_l1`` .. ``loss/rec_l3``, ``loss/align_12``, ``loss/align_23``, ``loss/total``;
- ``alignment/z_std_12`` .. (the collapse monitors, centred and raw);
- ``train/lr``, ``train/grad_norm``;
- ``throughput/crops_per_s``, ``throughput/mfu``, ``throughput/data_wait_s``, ``throughput/step_s``;
- ``validation/rec_l1`` .. ``validation/total`` (where the step validated; the set's kind, "held-out" or
  "seen", is in the run's text tag ``validation/set``);
- image ``reconstruction`` (the picture of the method, every ``train.pictures_every`` steps).

Fine-tuning (:meth:`Board.finetune_step`, :meth:`Board.finetune_validation`): ``finetune/loss``,
``finetune/lr``, ``dice/mean`` and ``dice/<class>`` per class (segmentation), or the classification
metrics under ``validation/``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SUBDIR = "tensorboard"
_STEP_SCALARS = {  # record key -> tag
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "mfu": "throughput/mfu",
    "data_wait_seconds": "throughput/data_wait_s",
    "step_seconds": "throughput/step_s",
}


def available() -> bool:
    """True when the ``tensorboard`` package (what torch's SummaryWriter needs) is installed."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


class Board:
    """A SummaryWriter under ``log_dir``, taking the loop's records as they are (no copy of the numbers)."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # purge_step: TensorBoard drops earlier files' events at steps >= it (a resume repeats those steps)
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)
        self._set_named = False

    def _scalar(self, tag: str, value: Any, step: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        if math.isfinite(float(value)):
            self.writer.add_scalar(tag, float(value), step)

    def step(self, record: Mapping[str, Any]) -> None:
        """One pre-training step's record (``history.jsonl``'s fields): losses, monitors, rates, validation."""
        step = int(record["step"])
        for key, value in record.items():
            if key.startswith(("rec_", "align_")) or key == "total":
                self._scalar(f"loss/{key}", value, step)
            elif key.startswith(("z_std", "zraw_std")):
                self._scalar(f"alignment/{key}", value, step)
            elif key.startswith("val_"):
                self._scalar(f"validation/{key[4:]}", value, step)
            elif key in _STEP_SCALARS:
                self._scalar(_STEP_SCALARS[key], value, step)
        seconds, crops = record.get("step_seconds"), record.get("crops_per_step")
        if isinstance(seconds, (int, float)) and seconds > 0 and isinstance(crops, (int, float)):
            self._scalar("throughput/crops_per_s", crops / seconds, step)
        if record.get("validation_set") and not self._set_named:
            self.writer.add_text("validation/set", str(record["validation_set"]), step)
            self._set_named = True

    def image(self, tag: str, png: str | Path, step: int) -> None:
        """A PNG file (the reconstruction figure) as an image; RGB, (H, W, 3)."""
        from matplotlib.image import imread

        img = imread(str(png))[..., :3]  # float in [0, 1]
        self.writer.add_image(tag, img, step, dataformats="HWC")

    def finetune_step(self, step: int, loss: float, lr: float) -> None:
        self._scalar("finetune/loss", loss, step)
        self._scalar("finetune/lr", lr, step)

    def finetune_validation(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Segmentation: ``dice/mean`` and ``dice/<class>`` (a class absent from every volume has no
        point); classification: every numeric metric under ``validation/``."""
        if "per_class_dice" in metrics:
            self._scalar("dice/mean", metrics.get("mean_dice"), step)
            for name, value in metrics["per_class_dice"].items():
                self._scalar(f"dice/{name}", value, step)
            return
        for key, value in metrics.items():
            self._scalar(f"validation/{key}", value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_board(enabled: bool, run_dir: str | Path, rank: int, resumed_at: int = 0) -> Board | None:
    """The run's board on rank 0 when ``enabled`` and TensorBoard is installed, else None. ``resumed_at``: the
    step a resumed run continues from (its checkpoint's); the steps after it that an earlier attempt logged
    are hidden in favour of the new ones."""
    if not enabled or rank != 0:
        return None
    if not available():
        log.info("TensorBoard not installed: no RUN/%s (pip install 'mim-scale[tensorboard]')", SUBDIR)
        return None
    board = Board(Path(run_dir) / SUBDIR, purge_step=resumed_at + 1 if resumed_at > 0 else None)
    log.info("TensorBoard events in %s (tensorboard --logdir %s)", board.log_dir, Path(run_dir).parent)
    return board
