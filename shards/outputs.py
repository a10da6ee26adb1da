"""The end of a shard build: the manifest, the public report and the private rejects and linkage files.

Written once every shard is closed, each atomically and durably; the manifest goes last, so its presence
means the whole set is complete:

* shareable ``OUT/build_report.json`` (counts only) and ``OUT/manifest.json``;
* private ``PRIVATE/rejects.jsonl`` (source, reason, detail of every input not built) and
  ``PRIVATE/linkage.jsonl`` (sample key -> source path, dataset, content hash, face flag).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter as CountDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mim_scale.errors import UserFacingError
from mim_scale.shards.format import AXIS_ORDER, DTYPE, FORMAT_NAME, FORMAT_VERSION, HU_MAX, HU_MIN, MANIFEST_NAME, \
    manifest_bytes
from mim_scale.shards.format import ShardInfo
from mim_scale.shards.rejects import REASONS
from mim_scale.shards.writer import write_durable


@dataclass
class BuildSummary:
    """What the outputs say: the built records (plan order), samples per data set, rejects per reason."""

    built: list[dict]
    datasets: dict[str, int]
    rejected: dict[str, int]
    rejects: list[dict]


def summarize(records: list[dict], discovery_rejects: list[dict]) -> BuildSummary:
    """``records``: one per planned item (``reason`` None = built); ``discovery_rejects``: inputs never planned."""
    rejects = list(discovery_rejects) + [
        {"source": r["source"], "reason": r["reason"], "detail": r["detail"], "dataset": r["dataset"], "key": r["key"]}
        for r in records if r["reason"]
    ]
    built = [r for r in records if r["reason"] is None]
    datasets = dict(sorted(CountDict(r["dataset"] for r in built).items()))
    reasons = dict(sorted(CountDict(r["reason"] for r in rejects).items()))
    return BuildSummary(built, datasets, reasons, rejects)


def software() -> dict[str, str]:
    """Versions of what decides the bytes, for the manifest."""
    import nibabel
    import numpy
    import pydicom
    import scipy

    from mim_scale import __version__

    return {"mim_scale": __version__, "numpy": numpy.__version__, "scipy": scipy.__version__,
            "pydicom": pydicom.__version__, "nibabel": nibabel.__version__}


def manifest(cfg: Any, shards: list[ShardInfo], summary: BuildSummary) -> dict[str, Any]:
    """The shareable manifest (``cfg``: the build config dataclass, with ``codec`` and ``spacing``)."""
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "axis_order": AXIS_ORDER,
        "dtype": DTYPE,
        "codec": cfg.codec,
        "hu_range": [HU_MIN, HU_MAX],
        "spacing_mm": cfg.spacing,
        "num_samples": len(summary.built),
        "datasets": summary.datasets,
        "shards": [{"url": s.url, "samples": s.samples, "bytes": s.bytes, "sha256": s.sha256, "datasets": s.datasets}
                   for s in shards],
        "build_config": dataclasses.asdict(cfg),
        "software": software(),
    }


def public_report(shards: list[ShardInfo], summary: BuildSummary, found: dict[str, int]) -> dict[str, Any]:
    """Counts only: nothing that names an input."""
    return {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "num_samples": len(summary.built), "num_shards": len(shards),
        "datasets": summary.datasets, "found": dict(sorted(found.items())), "rejected": summary.rejected,
        "rejected_total": len(summary.rejects), "reason_descriptions": {k: REASONS[k] for k in summary.rejected},
    }


def jsonl(records: list[dict]) -> bytes:
    return b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in records)


def write_outputs(out: Path, private: Path, cfg: Any, shards: list[ShardInfo], summary: BuildSummary,
                  found: dict[str, int]) -> None:
    """Private rejects and linkage, the public report, then the manifest (last: the set is complete)."""
    the_manifest = manifest(cfg, shards, summary)
    report = public_report(shards, summary, found)
    try:
        write_durable(private / "rejects.jsonl", jsonl(summary.rejects))
        write_durable(private / "linkage.jsonl", jsonl([
            {"key": r["key"], "source": r["source"], "dataset": r["dataset"], "content_sha256": r["content_sha256"],
             "face_bearing": r.get("face_bearing", "")}
            for r in summary.built
        ]))
        write_durable(out / "build_report.json", (json.dumps(report, indent=1, sort_keys=True) + "\n").encode())
        write_durable(out / MANIFEST_NAME, manifest_bytes(the_manifest))
    except OSError as exc:
        raise UserFacingError(f"writing the manifest and reports failed: {exc.strerror or exc} (re-run to finish)") from exc
