"""Exports by URI (issue 19 item 1, issue 15 item 7's export part): atomic local and ``s3://`` exports,
every sha256 verified before anything is read, remote exports pulled into a cache keyed by their
``SHA256SUMS``, partial and tampered exports refused with the file named. The object store is moto's
S3 server on loopback."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import boto3
import pytest
import torch
from safetensors.torch import load_file

from mim_scale import export_store
from mim_scale.cli import main
from mim_scale.export import export_run, load_encoder
from mim_scale.errors import UserFacingError
from mim_scale.export_store import SUMS_FILE, ExportIntegrityError


def _sums(folder: Path) -> dict[str, str]:
    return export_store.parse_sums((folder / SUMS_FILE).read_bytes(), "test")


def _same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and len(sa) > 10
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_export_replaces_a_folder_whole_and_loads_verified(trained_run, exported, tmp_path):
    out = tmp_path / "tiny"
    out.mkdir()
    (out / "stale.safetensors").write_bytes(b"from an older export")
    (out / "SHA256SUMS").write_text("0" * 64 + "  stale.safetensors\n")
    assert export_run(trained_run, out) == out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", SUMS_FILE, "config.json", "encoder.safetensors"]
    assert sorted(_sums(out)) == ["README.md", "config.json", "encoder.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no temporary or old folder left beside it
    encoder, config = load_encoder(out)
    _same_weights(encoder, load_encoder(exported)[0])
    assert config["local_path"] == str(out) and config["load_report"] == {"missing": [], "unexpected": []}


_KILL = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from mim_scale import export, export_store, model_card
    run, out, where = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    if where == "writing":       # the weights are written, the card and SHA256SUMS are not
        model_card.render = die
    else:                        # the new folder is renamed into place, the old one not yet deleted
        real = export_store.fsync_dir
        export_store.fsync_dir = lambda p: die() if Path(p) == out.parent else real(p)
    export.export_run(run, out)
""")


@pytest.mark.parametrize("where", ["writing", "renamed"])
def test_a_kill_during_export_leaves_one_complete_export(trained_run, tmp_path, where):
    """SIGKILL mid-export: the folder holds the old export or the new one, each complete, never a mix."""
    out = tmp_path / "tiny"
    export_run(trained_run, out, dtype="bfloat16")
    old = _sums(out)
    proc = subprocess.run([sys.executable, "-c", _KILL, str(trained_run), str(out), where], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    now = _sums(out)
    export_store.verify_folder(out)
    _, config = load_encoder(out)
    if where == "writing":
        assert now == old and config["dtype"] == "bfloat16"
    else:
        assert now != old and config["dtype"] == "float32"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", SUMS_FILE, "config.json", "encoder.safetensors"]


def test_partial_tampered_and_hostile_local_exports_are_refused(exported, tmp_path):
    def copy(name: str) -> Path:
        return Path(shutil.copytree(exported, tmp_path / name))

    bad = copy("flipped")
    data = bytearray((bad / "encoder.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of one weight
    (bad / "encoder.safetensors").write_bytes(bytes(data))
    with pytest.raises(ExportIntegrityError, match=r"flipped/encoder\.safetensors: sha256 .* does not match"):
        load_encoder(bad)
    with pytest.raises(ExportIntegrityError, match=r"encoder\.safetensors: sha256"):
        load_encoder(bad / "encoder.safetensors")  # the file alone, inside its folder, is checked too

    cfg = copy("config")
    (cfg / "config.json").write_text((cfg / "config.json").read_text().replace('"encoder_depth": 2', '"encoder_depth": 3'))
    with pytest.raises(ExportIntegrityError, match=r"config/config\.json: sha256"):
        load_encoder(cfg)

    partial = copy("partial")
    (partial / SUMS_FILE).unlink()
    with pytest.raises(ExportIntegrityError, match=r"partial: no SHA256SUMS"):
        load_encoder(partial)

    missing = copy("missing")
    (missing / "encoder.safetensors").unlink()
    with pytest.raises(ExportIntegrityError, match=r"missing/encoder\.safetensors: listed in SHA256SUMS but missing"):
        load_encoder(missing)

    escape = copy("escape")
    (tmp_path / "secret").write_text("outside")
    with open(escape / SUMS_FILE, "a") as f:
        f.write(hashlib.sha256(b"outside").hexdigest() + "  ../secret\n")
    with pytest.raises(ExportIntegrityError, match=r"'\.\./secret' is not a plain relative file name"):
        load_encoder(escape)

    # the command line: exit status 2 and the file named, before any fine-tuning starts
    rc = main(["finetune", "--task", "segmentation", "--data", str(tmp_path / "none.json"), "--init", str(bad),
               "--out", str(tmp_path / "ft")])
    assert rc == 2 and not (tmp_path / "ft" / "checkpoints").exists()


class _Spy:
    """A boto3 client that records which keys were uploaded and downloaded, in order."""

    def __init__(self, client, log: list[tuple[str, str]]):
        self._client, self._log = client, log

    def upload_file(self, filename, bucket, key, *a, **kw):
        self._log.append(("put", key))
        return self._client.upload_file(filename, bucket, key, *a, **kw)

    def get_object(self, **kw):
        self._log.append(("get", kw["Key"]))
        return self._client.get_object(**kw)

    def __getattr__(self, name):
        return getattr(self._client, name)


@pytest.fixture(scope="module")
def bucket(s3_server):
    boto3.client("s3").create_bucket(Bucket="lab-bucket")
    return "lab-bucket"


def test_s3_export_writes_the_index_last_and_loads_by_uri(trained_run, exported, bucket, export_cache,
                                                          monkeypatch):
    s3 = boto3.client("s3")
    export_run(trained_run, "s3://lab-bucket/exports/tiny-v1", full_state=True)  # an older export, with a file
    assert s3.head_object(Bucket=bucket, Key="exports/tiny-v1/mim_full.safetensors")  # the new one lacks
    log: list[tuple[str, str]] = []
    real = export_store._client
    monkeypatch.setattr(export_store, "_client", lambda: _Spy(real(), log))
    uri = export_run(trained_run, "s3://lab-bucket/exports/tiny-v1")
    assert uri == "s3://lab-bucket/exports/tiny-v1"
    puts = [k for op, k in log if op == "put"]
    assert puts[-1] == "exports/tiny-v1/SHA256SUMS" and len(puts) == 4
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="exports/")["Contents"])
    assert keys == [f"exports/tiny-v1/{n}" for n in ("README.md", SUMS_FILE, "config.json", "encoder.safetensors")]

    log.clear()
    encoder, config = load_encoder(uri)
    _same_weights(encoder, load_encoder(exported)[0])
    sums_bytes = s3.get_object(Bucket=bucket, Key="exports/tiny-v1/SHA256SUMS")["Body"].read()
    assert Path(config["local_path"]) == export_cache / hashlib.sha256(sums_bytes).hexdigest()
    assert ("get", "exports/tiny-v1/encoder.safetensors") in log
    log.clear()
    load_encoder(uri)  # the second load reads the verified cache: only the index comes from the store
    assert [k for op, k in log if op == "get"] == ["exports/tiny-v1/SHA256SUMS"]
    assert [p.name for p in export_cache.iterdir()] == [hashlib.sha256(sums_bytes).hexdigest()]
    # a cached file changed on this disk: the check catches it and the export is pulled again
    cached = Path(config["local_path"]) / "encoder.safetensors"
    cached.write_bytes(cached.read_bytes()[:-1] + b"\0")
    log.clear()
    _same_weights(load_encoder(uri)[0], encoder)
    assert ("get", "exports/tiny-v1/encoder.safetensors") in log


def test_export_refuses_to_overwrite_what_is_not_an_export(trained_run, bucket, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    with pytest.raises(UserFacingError, match=r"home: not an export \(no SHA256SUMS\) and holds 'notes.txt'"):
        export_run(trained_run, home)
    assert (home / "notes.txt").read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["home"]
    export_run(trained_run, tmp_path / "shelf" / "a")
    with pytest.raises(UserFacingError, match=r"shelf: holds another export \(a/SHA256SUMS\)"):
        export_run(trained_run, tmp_path / "shelf")
    export_store.verify_folder(tmp_path / "shelf" / "a")

    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key="shards/v1/shard-000000.tar", Body=b"training data")
    with pytest.raises(UserFacingError, match=r"s3://lab-bucket/shards: not an export .* 'v1/shard-000000.tar'"):
        export_run(trained_run, "s3://lab-bucket/shards")
    export_run(trained_run, "s3://lab-bucket/shelf/a")
    with pytest.raises(UserFacingError, match=r"s3://lab-bucket/shelf: holds another export"):
        export_run(trained_run, "s3://lab-bucket/shelf")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert {"shards/v1/shard-000000.tar", "shelf/a/SHA256SUMS"} <= keys


def test_s3_partial_and_tampered_exports_are_refused(trained_run, bucket, export_cache, tmp_path):
    s3 = boto3.client("s3")
    uri = export_run(trained_run, "s3://lab-bucket/exports/victim")
    good = s3.get_object(Bucket=bucket, Key="exports/victim/encoder.safetensors")["Body"].read()
    s3.put_object(Bucket=bucket, Key="exports/victim/encoder.safetensors", Body=good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(ExportIntegrityError,
                       match=r"s3://lab-bucket/exports/victim/encoder\.safetensors: sha256 .* does not match"):
        load_encoder(uri)
    assert not any(export_cache.iterdir())  # nothing half-pulled stays in the cache

    s3.delete_object(Bucket=bucket, Key="exports/victim/encoder.safetensors")
    with pytest.raises(ExportIntegrityError, match=r"victim/encoder\.safetensors: listed in SHA256SUMS but"):
        load_encoder(uri)

    s3.delete_object(Bucket=bucket, Key="exports/victim/SHA256SUMS")  # an upload that died before its index
    with pytest.raises(ExportIntegrityError, match=r"s3://lab-bucket/exports/victim: no SHA256SUMS"):
        load_encoder(uri)
    rc = main(["evaluate", "--data", str(tmp_path / "none.json"), "--init", uri, "--out", str(tmp_path / "r.json")])
    assert rc == 2


def test_finetune_from_an_s3_uri_in_one_command(trained_run, bucket, export_cache, finetune_data, tmp_path):
    """A researcher with only a URI: `mim-scale finetune --init s3://...` pulls, verifies, fine-tunes."""
    uri = export_run(trained_run, "s3://lab-bucket/exports/for-finetune")
    data = finetune_data
    out = tmp_path / "ft"
    rc = main(["finetune", "--task", "segmentation", "--recipe", "sample_ct", "--init", uri, "--data", str(data),
               "--out", str(out), "--set", "train.steps=2"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["init"] == uri and summary["pretrained"] and summary["steps"] == 2
    # the fine-tuned network started from the pulled encoder: after 2 warm-up steps its encoder is far
    # nearer the export than a scratch encoder is
    from mim_scale.finetune.checkpoint import latest_checkpoint
    from mim_scale.model import build_encoder

    pulled = load_file(str(next(export_cache.iterdir()) / "encoder.safetensors"))
    tuned = load_file(str(latest_checkpoint(out) / "model.safetensors"))
    scratch = build_encoder(load_encoder(uri)[0].cfg).state_dict()
    moved = sum((tuned[f"encoder.{k}"] - v).pow(2).sum() for k, v in pulled.items()).sqrt()
    apart = sum((scratch[k] - v).pow(2).sum() for k, v in pulled.items()).sqrt()
    assert moved < 0.05 * apart, (float(moved), float(apart))
