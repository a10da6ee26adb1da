"""Shards read from an object store: moto's S3 server on loopback holds the real-CT shards and their
manifest; the stream reads them through ``pipe:python -m mim_scale.data.s3cat`` and training runs on them."""

from __future__ import annotations

import json

import boto3
import pytest
import torch

from mim_scale.data import s3cat
from mim_scale.data.stream import load_shard_list, make_loader
from mim_scale.engine.local import launch_local, step_log
from mim_scale.errors import UserFacingError


@pytest.fixture(scope="module")
def bucket(s3_server, engine_shards):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="ct-shards")
    for f in sorted(engine_shards.iterdir()):
        if f.is_file():
            s3.upload_file(str(f), "ct-shards", f"shards/v1/{f.name}")
    # a second, local manifest that names the shards by absolute s3:// URLs (data.allow_external_shard_urls)
    manifest = json.loads((engine_shards / "manifest.json").read_text())
    for entry in manifest["shards"]:
        entry["url"] = f"s3://ct-shards/shards/v1/{entry['url']}"
    return manifest


def test_stream_reads_the_same_crops_from_s3_as_from_disk(bucket, engine_shards, tiny_config, tmp_path):
    cfg = tiny_config(engine_shards).data
    local = load_shard_list(str(engine_shards))
    remote = load_shard_list("s3://ct-shards/shards/v1/manifest.json")
    assert all(s.url.startswith("pipe:") and "mim_scale.data.s3cat" in s.url for s in remote)
    (tmp_path / "manifest.json").write_text(json.dumps(bucket))
    with pytest.raises(UserFacingError, match="shard entry 0"):  # another store: only with the opt-in
        load_shard_list(str(tmp_path / "manifest.json"))
    via_local_manifest = load_shard_list(str(tmp_path / "manifest.json"), allow_external=True)
    assert [s.url for s in via_local_manifest] == [s.url for s in remote]
    a = [next(it) for it in [iter(make_loader(cfg, local, rank=0, world_size=1, batch_size=2))] for _ in range(3)]
    b = [next(it) for it in [iter(make_loader(cfg, remote, rank=0, world_size=1, batch_size=2))] for _ in range(3)]
    for x, y in zip(a, b):
        assert torch.equal(x["crop"], y["crop"])
        assert [m["shard"] for m in x["meta"]] == [m["shard"] for m in y["meta"]]


def test_training_on_s3_shards(bucket, engine_shards, tiny_config, tmp_path):
    cfg = tiny_config("s3://ct-shards/shards/v1/", "train.steps=3", "train.zero_stage=2")
    results = launch_local(cfg, tmp_path, 2)
    assert results[0]["samples_seen"] == 6 and results[0]["corrupt_skipped"] == 0
    assert len(step_log(tmp_path, 1)) == 3


def test_missing_object_is_a_clear_error(bucket):
    with pytest.raises(UserFacingError, match="s3://ct-shards/nothing/manifest.json"):
        load_shard_list("s3://ct-shards/nothing/")
    assert s3cat.main(["s3://ct-shards/shards/v1/absent.tar"]) == 1
    with pytest.raises(ValueError, match="not an s3://bucket/key"):
        s3cat.split_s3_url("http://example/x")
