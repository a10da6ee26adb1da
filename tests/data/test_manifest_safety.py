"""Manifests from elsewhere: a shard URL that would run a command, leave the manifest's folder or name
another store is refused (entry named) before anything reads it, also by the launcher before any worker
starts; the opt-in restores the old reading; a streamed shard is checked against the manifest's sha256
before any of its samples is used."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import webdataset as wds

from mim_scale.config import DataConfig, load_config
from mim_scale.data.stream import CropStream, ShardInfo, load_shard_list, manifest_shards
from mim_scale.errors import UserFacingError
from mim_scale.shards.format import encode_volume


@pytest.fixture(scope="module")
def real_shards(ct_dir, tmp_path_factory) -> Path:
    """One shard of three 40^3 blocks of the real CT, with a manifest carrying its size and sha256."""
    img = nib.load(str(ct_dir / "abdomen_pelvis_ct.nii.gz"))
    vol = np.clip(np.asarray(img.dataobj), -1024, 3071).astype(np.int16).transpose(2, 1, 0)
    folder = tmp_path_factory.mktemp("manifest_safety")
    with wds.TarWriter(str(folder / "shard-0000.tar"), encoder=False) as tar:
        for i in range(3):
            block = np.ascontiguousarray(vol[i * 10:i * 10 + 40, 100:140, 100:140])
            key = f"v{i:03d}"
            tar.write({"__key__": key, "npy": encode_volume(block, "npy"),
                       "json": json.dumps({"key": key, "dataset": "d", "shape": list(block.shape)}).encode()})
    data = (folder / "shard-0000.tar").read_bytes()
    entry = {"url": "shard-0000.tar", "samples": 3, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps({"shards": [entry]}))
    return folder


def _hostile(folder: Path, url: str) -> Path:
    """A manifest whose second entry is ``url`` (the first is a real shard)."""
    manifest = {"shards": [{"url": "shard-0000.tar", "samples": 3}, {"url": url, "samples": 1}]}
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def _copy(real_shards: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "shard-0000.tar").write_bytes((real_shards / "shard-0000.tar").read_bytes())
    return dest


def test_pipe_entry_is_refused_and_runs_nothing(real_shards, tmp_path):
    folder = _copy(real_shards, tmp_path / "m")
    marker = tmp_path / "pwned"
    url = f"pipe:touch {marker}; cat {folder / 'shard-0000.tar'}"
    manifest = _hostile(folder, url)
    with pytest.raises(UserFacingError) as err:
        load_shard_list(str(manifest))
    assert "shard entry 1" in str(err.value) and "pipe:" in str(err.value) and str(manifest) in str(err.value)
    assert "allow_external_shard_urls" in str(err.value)
    # the launcher refuses it on the driver, before Ray or any worker starts
    from mim_scale.launcher.ray_train import pretrain

    cfg = load_config("tiny", [f"data.shards={folder}", f"launch.storage={tmp_path / 'runs'}", "launch.name=h"])
    with pytest.raises(UserFacingError, match="shard entry 1"):
        pretrain(cfg)
    import ray

    assert not ray.is_initialized()
    assert not marker.exists()
    # the check is what stopped it: with the explicit opt-in the same entry is read, and its command runs
    shards = load_shard_list(str(manifest), allow_external=True)
    assert shards[1].url == url
    stream = CropStream(DataConfig(crop_size=16, crops_per_volume=1, shuffle_buffer=1, num_workers=0), shards[1:])
    next(iter(stream))
    assert marker.exists()


@pytest.mark.parametrize("url, reason", [
    ("/etc/passwd", "absolute path"),
    ("../outside/shard-0000.tar", "'..'"),
    ("sub/../../x.tar", "'..'"),
    ("http://example.com/shard.tar", "URL scheme"),
    ("file:shard-0000.tar", "URL scheme"),
    ("s3://other-bucket/shard.tar", "not in that bucket"),
    ("shard 0000.tar", "characters outside"),
    ("$(id).tar", "characters outside"),
])
def test_entries_outside_the_folder_are_refused(real_shards, tmp_path, url, reason):
    manifest = _hostile(_copy(real_shards, tmp_path / "m"), url)
    with pytest.raises(UserFacingError, match="shard entry 1") as err:
        load_shard_list(str(manifest))
    assert reason in str(err.value) and repr(url) in str(err.value)


def test_symlink_leaving_the_folder_is_refused(real_shards, tmp_path):
    folder = _copy(real_shards, tmp_path / "m")
    outside = _copy(real_shards, tmp_path / "elsewhere")
    (folder / "link.tar").symlink_to(outside / "shard-0000.tar")
    with pytest.raises(UserFacingError, match="outside"):
        load_shard_list(str(_hostile(folder, "link.tar")))


def test_s3_entries_must_stay_under_the_manifest_prefix():
    from mim_scale.data.stream import check_shard_url

    base = "s3://bucket/shards/v1"
    ok = check_shard_url("s3://bucket/shards/v1/shard-0.tar", index=0, where="m", base=base, allow_external=False)
    assert ok == "s3://bucket/shards/v1/shard-0.tar"
    assert check_shard_url("part/shard-0.tar", index=0, where="m", base=base, allow_external=False) == \
        "s3://bucket/shards/v1/part/shard-0.tar"
    for bad in ("s3://bucket/shards/v10/shard-0.tar", "s3://bucket/shards/v1/../v2/s.tar", "s3://evil/shards/v1/s.tar"):
        with pytest.raises(UserFacingError, match="shard entry 3"):
            check_shard_url(bad, index=3, where="m", base=base, allow_external=False)


def test_opt_in_is_a_config_key(real_shards, tmp_path):
    folder = _copy(real_shards, tmp_path / "m")
    _hostile(folder, str(folder / "shard-0000.tar"))  # an absolute path: refused by default
    with pytest.raises(UserFacingError):
        manifest_shards(load_config("tiny", [f"data.shards={folder}"]).data)
    cfg = load_config("tiny", [f"data.shards={folder}", "data.allow_external_shard_urls=true"])
    assert [s.url for s in manifest_shards(cfg.data)][1] == str(folder / "shard-0000.tar")


def _crops(shard: ShardInfo, n: int) -> list[dict]:
    stream = iter(CropStream(DataConfig(crop_size=24, crops_per_volume=2, shuffle_buffer=2, num_workers=0, seed=1),
                             [shard]))
    return [next(stream) for _ in range(n)]


def test_streamed_shard_checked_against_sha256_before_use(real_shards, tmp_path):
    (local,) = load_shard_list(str(real_shards))
    assert local.sha256 and local.bytes > 0
    streamed = ShardInfo(url=f"pipe:cat {local.url}", samples=3, datasets={"d": 3}, sha256=local.sha256,
                         bytes=local.bytes)
    a, b = _crops(local, 6), _crops(streamed, 6)
    for x, y in zip(a, b):  # the verified stream path gives the memmap path's crops
        assert torch.equal(x["crop"], y["crop"]) and x["meta"]["key"] == y["meta"]["key"]
    assert max(x["meta"]["corrupt"] for x in b) == 0

    # one byte changed inside a volume: the sizes agree, the sha256 does not; no sample of it is used
    tampered = tmp_path / "shard-0000.tar"
    data = bytearray((real_shards / "shard-0000.tar").read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    bad = ShardInfo(url=f"pipe:cat {tampered}", samples=3, datasets={"d": 3}, sha256=local.sha256, bytes=local.bytes)
    stream = CropStream(DataConfig(crop_size=24, crops_per_volume=2, shuffle_buffer=2, num_workers=0, seed=1), [bad])
    items = list(stream._read_pick(0, bad))
    assert items == [None]  # the whole shard skipped as corrupt, nothing decoded from it
    longer = ShardInfo(url=f"pipe:cat {tampered} {tampered}", samples=3, datasets={"d": 3}, sha256=local.sha256,
                       bytes=local.bytes)
    assert list(stream._read_pick(0, longer)) == [None]  # more bytes than the manifest says: stopped there
