"""The export's ``README.md``: a Hugging Face model card (YAML front matter + prose) for a foundation encoder.

The front matter is what the Hub and ``huggingface_hub.ModelCard`` read: ``license`` (+ ``license_name`` /
``license_link`` when it is ``other``), ``library_name``, ``tags``, ``datasets``, ``metrics``,
``pipeline_tag``, and ``model-index`` when an ``evaluate`` report was exported with the weights.

**Licence.** Weights learnt from data carry that data's terms, so the card states the licence of every
training data set (from ``--data-license NAME=ID``, the shard manifest's ``licenses`` block, or the short
table of public CT collections below, in that order) and the weights' licence follows from them: one
licence shared by every data set -> that licence; anything else (several licences, or any data set whose
terms are unknown) -> ``license: other``, with the per-data-set list in the card. This records terms; it is
not legal advice, and an operator who knows better overrides it with ``--data-license``.
"""

from __future__ import annotations

from typing import Any

import yaml

LIBRARY_NAME = "mim-scale"
# Hub licence ids of public CT collections whose terms are stated by their publishers. Keys are the data
# set names given to `mim-scale shards build NAME=PATH` (lower case); add yours with --data-license.
KNOWN_DATA_LICENSES: dict[str, tuple[str, str]] = {
    # TotalSegmentator's CT data set (Wasserthal et al.), Zenodo record 10047292: CC BY 4.0
    "totalsegmentator": ("cc-by-4.0", "https://zenodo.org/records/10047292"),
    # the test CT inside the totalsegmentator 2.18.0 source archive (the project's sample data): Apache-2.0
    "totalsegmentator_sample": ("apache-2.0", "https://pypi.org/project/TotalSegmentator/2.18.0/"),
    # Medical Segmentation Decathlon: CC BY-SA 4.0
    "msd": ("cc-by-sa-4.0", "http://medicaldecathlon.com/"),
    # LIDC-IDRI on TCIA: CC BY 3.0
    "lidc-idri": ("cc-by-3.0", "https://www.cancerimagingarchive.net/collection/lidc-idri/"),
}
UNKNOWN = "unknown"


def data_licenses(datasets: dict[str, int], given: dict[str, str] | None = None,
                  manifest: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    """{data set: {"license": hub id or "unknown", "source": where that came from, "link": url or ""}}."""
    given = {k: v.lower() for k, v in (given or {}).items()}
    manifest = {k: str(v).lower() for k, v in (manifest or {}).items()}
    out: dict[str, dict[str, str]] = {}
    for name in sorted(datasets):
        if name in given:
            out[name] = {"license": given[name], "source": "--data-license", "link": ""}
        elif name in manifest:
            out[name] = {"license": manifest[name], "source": "shard manifest", "link": ""}
        elif name.lower() in KNOWN_DATA_LICENSES:
            lic, link = KNOWN_DATA_LICENSES[name.lower()]
            out[name] = {"license": lic, "source": "mim-scale's table of public collections", "link": link}
        else:
            out[name] = {"license": UNKNOWN, "source": "not recorded", "link": ""}
    return out


def weights_license(licenses: dict[str, dict[str, str]]) -> str:
    """The Hub licence id of the weights: the data's one shared licence, else ``other``."""
    ids = {v["license"] for v in licenses.values()}
    if len(ids) == 1 and UNKNOWN not in ids:
        return ids.pop()
    return "other"


def front_matter(config: dict[str, Any], evaluation: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card's YAML metadata (a dict, in the Hub's field names)."""
    t = config["training"]
    data = t.get("data") or {}
    licenses = data.get("licenses") or {}
    lic = weights_license(licenses) if licenses else "other"
    meta: dict[str, Any] = {"license": lic}
    if lic == "other":
        meta["license_name"] = "training-data-terms"
        meta["license_link"] = "README.md#licence"
    meta.update({
        "library_name": LIBRARY_NAME,
        "pipeline_tag": "image-feature-extraction",
        "tags": ["medical-imaging", "ct", "3d", "self-supervised-learning", "masked-image-modeling", "mim",
                 "foundation-model", "safetensors", "monai"],
        "datasets": sorted((data.get("datasets") or {}).keys()),
        # pre-training reports per-level reconstruction MSE; fine-tuning reports Dice or accuracy
        "metrics": ["mse"],
    })
    if evaluation:
        index = _model_index(config, evaluation)
        if index:
            meta["metrics"] = sorted({"mse", *[m["type"] for m in index[0]["results"][0]["metrics"]]})
            meta["model-index"] = index
    return meta


def _model_index(config: dict[str, Any], evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """Hub ``model-index`` from an ``evaluate`` report: the pretrained run's validation metrics."""
    runs = evaluation.get("runs") or {}
    pre = [r for r in runs.values() if isinstance(r, dict) and r.get("pretrained")]
    if not pre:
        return []
    val = pre[0].get("validation") or {}
    metrics = [{"type": name, "name": name, "value": float(val[name])}
               for name in ("mean_dice", "accuracy", "auc") if isinstance(val.get(name), (int, float))]
    if not metrics:
        return []
    task = "image-segmentation" if evaluation.get("task") == "segmentation" else "image-classification"
    return [{"name": f"mim-encoder-{config['parameters']}",
             "results": [{"task": {"type": task, "name": f"{evaluation.get('task', 'fine-tuning')} (fine-tuned)"},
                          "dataset": {"type": "custom", "name": str(evaluation.get("data", "evaluation data"))},
                          "metrics": metrics}]}]


def render(config: dict[str, Any], evaluation: dict[str, Any] | None = None) -> str:
    """The whole README.md: YAML front matter, then the card."""
    meta = front_matter(config, evaluation)
    t, p, m = config["training"], config["preprocessing"], config["model"]
    losses = ", ".join(f"{k} {v:.4f}" for k, v in sorted(t["losses"].items())) or "n/a"
    data = t.get("data") or {}
    datasets = ", ".join(f"{k} ({v} volumes)" for k, v in sorted((data.get("datasets") or {}).items())) or "unknown"
    licenses = data.get("licenses") or {}
    lic_rows = "\n".join(f"| {name} | {v['license']} | {v['source']}{' (' + v['link'] + ')' if v['link'] else ''} |"
                         for name, v in sorted(licenses.items())) or "| (no data set recorded) | unknown | |"
    if meta["license"] == "other":
        lic_text = ("The training data sets do not share one known licence, so the weights are marked `other`: "
                    "their use is bound by every data set's terms below. Data sets marked `unknown` have no "
                    "recorded terms; find them before sharing the weights (re-export with "
                    "`--data-license NAME=ID`).")
    else:
        lic_text = f"Every training data set is `{meta['license']}`, so the weights are released under it."
    n = config["input_size"][0]
    eval_text = ""
    if evaluation and meta.get("model-index"):
        rows = "\n".join(f"| {r['name']} | {r['value']:.4f} |" for r in meta["model-index"][0]["results"][0]["metrics"])
        eval_text = f"\n## Downstream results (`evaluation.json`)\n| metric | value |\n| --- | --- |\n{rows}\n"
    body = f"""# MiM foundation encoder (mim-scale {config['software_version']})

A 3D CT encoder pre-trained with MiM (Mask in Mask) by mim-scale: hybrid conv + transformer backbone,
widths {list(m['widths'])}, {m['encoder_depth']} transformer blocks, patch {config['patch_size']}, input
{n}^3, {config['parameters']:,} parameters ({config['dtype']}).

## Training
- steps: {t['step']}, crops seen: {t['samples_seen']}, visible tokens seen: {t['tokens_seen']}
- final losses: {losses}
- masking: levels {t['masking']['levels']}, ratios {t['masking']['level1_ratio']} / {t['masking']['level2_ratio']} / {t['masking']['level3_ratio']}
- data: {datasets}
{eval_text}
## Preprocessing (apply the same at fine-tuning and inference)
- orientation {p['orientation']}, spacing {p['spacing_mm']} mm isotropic
- HU window [{p['hu_min']}, {p['hu_max']}]; {p['scaling']}

## Use
```python
from mim_scale import load_encoder
encoder, config = load_encoder("THIS_FOLDER")      # or "s3://bucket/prefix/NAME"; every sha256 checked first
features = encoder.forward_features(x)              # x: (N, 1, {n}, {n}, {n}) in [0, 1]
```
Fine-tune: `mim-scale finetune --task segmentation --data dataset.json --init THIS_FOLDER`.
A folder downloaded from the Hub (`hf download ORG/NAME --local-dir DIR`) loads as it is: `load_encoder("DIR")`.

## Licence
{lic_text}

| data set | licence | where the terms come from |
| --- | --- | --- |
{lic_rows}

## Upload to the Hugging Face Hub
This folder is a model repository as it is (safetensors weights, `config.json`, this card, `SHA256SUMS`):
```bash
huggingface-cli upload ORG/NAME THIS_FOLDER .     # huggingface_hub >= 1.0: hf upload ORG/NAME THIS_FOLDER .
```

## Intended use
Research: initialisation for CT segmentation and classification models. Not a medical device; not for
clinical decisions. Files are checked by `sha256sum -c SHA256SUMS` (the loader does it on every load).
"""
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + body
