"""The crop stream: real CT crops (int16, windowed on the device bit-identically to the loaders' old float32
crops), exact order on resume, node/worker split, corrupt shards skipped."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import webdataset as wds

from mim_scale.config import DataConfig
from mim_scale.data.stream import AIR_HU, CropStream, crop_hu, load_shard_list, make_loader, shard_weights
from mim_scale.data.window import hu_window
from mim_scale.shards.format import encode_volume


def _write_shards(folder: Path, volumes: list[tuple[str, np.ndarray]], per_shard: int) -> Path:
    """Shards in the builder's format from real volumes (one dataset name per volume)."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for s in range(math.ceil(len(volumes) / per_shard)):
        name = f"shard-{s:04d}.tar"
        chunk = volumes[s * per_shard:(s + 1) * per_shard]
        datasets: dict[str, int] = {}
        with wds.TarWriter(str(folder / name), encoder=False) as tar:
            for i, (dataset, vol) in enumerate(chunk):
                key = f"{s:04d}{i:04d}"
                meta = {"key": key, "dataset": dataset, "shape": list(vol.shape)}
                tar.write({"__key__": key, "npy.gz": encode_volume(vol, "npy.gz"), "json": json.dumps(meta).encode()})
                datasets[dataset] = datasets.get(dataset, 0) + 1
        entries.append({"url": name, "samples": len(chunk), "datasets": datasets})
    (folder / "manifest.json").write_text(json.dumps({"shards": entries}))
    return folder


@pytest.fixture(scope="module")
def real_volume(ct_dir) -> np.ndarray:
    img = nib.load(str(ct_dir / "abdomen_pelvis_ct.nii.gz"))
    return np.clip(np.asarray(img.dataobj), -1024, 3071).astype(np.int16).transpose(2, 1, 0).copy()


@pytest.fixture(scope="module")
def shard_dir(real_volume, tmp_path_factory) -> Path:
    # six "volumes": sub-blocks of the real CT, so that each is distinct real anatomy
    vols = [("big" if i < 4 else "small", real_volume[i * 10:i * 10 + 60]) for i in range(6)]
    return _write_shards(tmp_path_factory.mktemp("shards"), vols, per_shard=2)


def _cfg(**kw) -> DataConfig:
    base = dict(crop_size=32, crops_per_volume=2, shuffle_buffer=2, num_workers=0, seed=3)
    base.update(kw)
    return DataConfig(**base)


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def old_float32_crop(volume: np.ndarray, size: int, offsets: tuple[float, float, float],
                     hu_min: float, hu_max: float) -> torch.Tensor:
    """The loaders' float32 crop before int16 batches (``crop_window``, stream.py at 919fbe9), frozen here
    verbatim as the reference the int16 path must reproduce bit for bit."""
    pads = [max(0, size - n) for n in volume.shape]
    if any(pads):
        volume = np.pad(volume, [(p // 2, p - p // 2) for p in pads], constant_values=AIR_HU)
    starts = [min(int(u * (n - size + 1)), n - size) for u, n in zip(offsets, volume.shape)]
    patch = volume[starts[0]:starts[0] + size, starts[1]:starts[1] + size, starts[2]:starts[2] + size]
    crop = torch.from_numpy(np.ascontiguousarray(patch)).float()
    crop = (crop.clamp_(hu_min, hu_max) - hu_min) / (hu_max - hu_min)
    return crop.unsqueeze(0)


def test_crop_real_ct(real_volume):
    crop = crop_hu(real_volume, 48, (0.5, 0.5, 0.5))
    assert crop.shape == (1, 48, 48, 48) and crop.dtype == torch.int16
    d, h, w = real_volume.shape
    start = [int(0.5 * (n - 48 + 1)) for n in (d, h, w)]
    np.testing.assert_array_equal(crop[0].numpy(), real_volume[start[0]:start[0] + 48, start[1]:start[1] + 48,
                                                                start[2]:start[2] + 48])
    # the window mapping of a voxel, on the device side: HU -1000 -> 0, +1000 -> 1
    x = hu_window(crop[None], -1000, 1000)
    assert x.shape == (1, 1, 48, 48, 48) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    hu = float(real_volume[start[0] + 5, start[1] + 7, start[2] + 9])
    assert x[0, 0, 5, 7, 9].item() == pytest.approx((min(max(hu, -1000), 1000) + 1000) / 2000, abs=1e-6)


def test_small_volume_is_padded_with_air(real_volume):
    crop = crop_hu(real_volume[:10, :20, :30], 32, (0.9, 0.1, 0.3))
    assert crop.shape == (1, 32, 32, 32)
    assert crop[0, 0, 0, 0].item() == AIR_HU  # air corner
    assert hu_window(crop[None], -1000, 1000).max() > 0.3  # real tissue is inside


@pytest.mark.parametrize("window", [(-1000.0, 1000.0), (-175.0, 250.0), (-57.0, 175.0), (-1000.5, 999.25)])
def test_int16_crop_windowed_is_the_old_float32_crop_real_ct(real_volume, window):
    """Crop (int16, cut without a padded copy) then window (table on the device): exactly the loaders' old
    float32 crops, at the recipe's window and the fine-tuning ones (a non-integer window too), on the real
    CT whole, on sub-volumes smaller than the crop along some axes (air padding, odd sizes), and at the
    extreme offsets."""
    hu_min, hu_max = window
    rng = np.random.default_rng(0)
    cases = [(real_volume, 96, (0.0, 0.0, 0.0)), (real_volume, 96, (0.999999, 0.999999, 0.999999)),
             (real_volume[:33, :71, :20], 48, (0.9, 0.1, 0.3)), (real_volume[5:12], 40, (0.5, 0.99, 0.0)),
             (real_volume[:, 100:101, :], 16, (0.2, 0.7, 0.4))]
    cases += [(real_volume, 64, tuple(rng.random(3))) for _ in range(6)]
    for volume, size, offsets in cases:
        new = hu_window(crop_hu(volume, size, offsets)[None], hu_min, hu_max)[0]
        assert torch.equal(new, old_float32_crop(volume, size, offsets, hu_min, hu_max)), (volume.shape, size, offsets)


def test_window_of_every_int16_value():
    """The device table against the old formula for all 65,536 int16 values (an off-by-one in the table's
    index would shift every voxel by one HU)."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).reshape(1, 1, 16, 64, 64)
    old = (every.float().clamp_(-1000.0, 1000.0) - -1000.0) / (1000.0 - -1000.0)
    assert torch.equal(hu_window(every, -1000.0, 1000.0), old)
    with pytest.raises(TypeError, match="int16"):
        hu_window(every.float(), -1000.0, 1000.0)


def test_same_order_every_time_and_resume_exact(shard_dir):
    shards = load_shard_list(str(shard_dir))
    cfg = _cfg(num_workers=2)
    straight = _take(make_loader(cfg, shards, rank=0, world_size=1, batch_size=2), 9)
    again = _take(make_loader(cfg, shards, rank=0, world_size=1, batch_size=2), 9)
    for a, b in zip(straight, again):
        assert torch.equal(a["crop"], b["crop"])
    resumed = _take(make_loader(cfg, shards, rank=0, world_size=1, batch_size=2, batches_consumed=5), 4)
    for a, b in zip(straight[5:], resumed):
        assert [m["key"] for m in a["meta"]] == [m["key"] for m in b["meta"]]
        assert torch.equal(a["crop"], b["crop"])


def test_ranks_read_different_picks(shard_dir):
    shards = load_shard_list(str(shard_dir))
    cfg = _cfg()
    picks = [{m["pick"] for b in _take(make_loader(cfg, shards, rank=r, world_size=2, batch_size=1), 12) for m in b["meta"]}
             for r in (0, 1)]
    assert picks[0] and picks[1] and not picks[0] & picks[1]
    assert all(p % 2 == 0 for p in picks[0]) and all(p % 2 == 1 for p in picks[1])


def test_mixture_weights(shard_dir):
    shards = load_shard_list(str(shard_dir))
    # no mixture: proportional to volumes (4 big, 2 small)
    w = shard_weights(shards, {})
    assert w == [2.0, 2.0, 2.0]
    # equal dataset weights: the small set's single shard gets as much as the big set's two together
    w = shard_weights(shards, {"big": 1.0, "small": 1.0})
    assert w[2] == pytest.approx(w[0] + w[1])
    stream = CropStream(_cfg(mixture={"big": 1.0, "small": 1.0}), shards)
    counts = np.bincount([stream.pick(i) for i in range(3000)], minlength=3)
    assert abs(counts[2] / 3000 - 0.5) < 0.05


def test_truncated_shard_is_skipped_and_counted(shard_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in shard_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    data = (broken / "shard-0001.tar").read_bytes()
    (broken / "shard-0001.tar").write_bytes(data[: len(data) // 3])
    shards = load_shard_list(str(broken))
    batches = _take(make_loader(_cfg(), shards, rank=0, world_size=1, batch_size=1), 30)
    metas = [m for b in batches for m in b["meta"]]
    assert max(m["corrupt"] for m in metas) >= 1
    assert {m["shard"] for m in metas} >= {"shard-0000.tar", "shard-0002.tar"}


def _npy_shards(real_volume, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    vols = [real_volume[i * 12:i * 12 + 50] for i in range(3)]
    with wds.TarWriter(str(folder / "shard-0000.tar"), encoder=False) as tar:
        for i, vol in enumerate(vols):
            key = f"v{i:03d}"
            meta = {"key": key, "dataset": "d", "shape": list(vol.shape)}
            tar.write({"__key__": key, "npy": encode_volume(vol, "npy"), "json": json.dumps(meta).encode()})
    (folder / "manifest.json").write_text(json.dumps({"shards": [{"url": "shard-0000.tar", "samples": 3}]}))
    return folder


def test_local_memmap_path_equals_webdataset_path(real_volume, tmp_path):
    """Local shards are read through a tar index with .npy members memory-mapped; the crops must equal
    those of webdataset's streaming reader (the path used for pipe:/http shards)."""
    from dataclasses import replace

    from mim_scale.data.stream import local_members

    folder = _npy_shards(real_volume, tmp_path / "npy")
    samples = list(local_members(str(folder / "shard-0000.tar")))
    assert [s["__key__"] for s in samples] == ["v000", "v001", "v002"]
    assert isinstance(samples[0]["npy"], np.memmap)
    np.testing.assert_array_equal(samples[1]["npy"], real_volume[12:62])
    local = load_shard_list(str(folder))
    piped = [replace(s, url=f"pipe:cat {s.url}") for s in local]
    cfg = _cfg(crop_size=40, crops_per_volume=3, shuffle_buffer=2)
    a = _take(make_loader(cfg, local, rank=0, world_size=1, batch_size=2), 6)
    b = _take(make_loader(cfg, piped, rank=0, world_size=1, batch_size=2), 6)
    for x, y in zip(a, b):
        assert torch.equal(x["crop"], y["crop"])
        assert [m["key"] for m in x["meta"]] == [m["key"] for m in y["meta"]]


def test_truncated_npy_shard_on_the_memmap_path(real_volume, tmp_path):
    from mim_scale.data.stream import local_members

    folder = _npy_shards(real_volume, tmp_path / "npy")
    shard = folder / "shard-0000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * 0.6)])
    samples = list(local_members(str(shard)))
    assert samples[-1]["__key__"] == "__corrupt__" and "__error__" in samples[-1]
    assert [s["__key__"] for s in samples[:-1]] == ["v000"]  # the complete volume before the cut survives


def test_loader_batches_windowed_are_the_old_float32_crops(real_volume, tmp_path):
    """End to end on the memory-map path: make_loader's int16 batches (two worker processes, each crop cut
    from the shard's np.memmap straight into a shared-memory batch buffer, air-padded where the 50-slice
    volumes are thinner than the crop), windowed as the training step does, equal the loaders' old float32
    crops at the same stream positions bit for bit."""
    folder = _npy_shards(real_volume, tmp_path / "npy")
    shards = load_shard_list(str(folder))
    cfg = _cfg(crop_size=56, crops_per_volume=2, shuffle_buffer=2, num_workers=2)
    batches = _take(make_loader(cfg, shards, rank=0, world_size=1, batch_size=2, pin_memory=False), 4)
    assert all(b["crop"].dtype == torch.int16 and b["crop"].shape == (2, 1, 56, 56, 56) for b in batches)
    for worker in (0, 1):  # loader worker w reads stream w of 2 and serves batches w, w + 2
        crops = CropStream(cfg, shards, rank=worker, world_size=2, batch_size=2)._crops()
        old = [(old_float32_crop(v, 56, o, cfg.hu_min, cfg.hu_max), meta["key"]) for v, o, meta in
               (next(crops) for _ in range(4))]
        got = [(crop, meta["key"]) for b in batches[worker::2]
               for crop, meta in zip(hu_window(b["crop"], cfg.hu_min, cfg.hu_max), b["meta"])]
        assert [key for _, key in got] == [key for _, key in old]
        assert all(torch.equal(x, y) for (x, _), (y, _) in zip(got, old))
