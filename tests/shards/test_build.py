"""Builder behaviour: privacy of the shareable set and logs, resume and determinism, kill -9, exclusions,
metrics, the Ray path, enhanced CT and the CLI subcommands."""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from mim_scale.shards import metrics
from mim_scale.shards.builder import BuildConfig, build_shards
from mim_scale.shards.cli import main as cli_main
from mim_scale.shards.dicom import StackTolerances, load_series
from mim_scale.shards.format import decode_sample, read_manifest
from mim_scale.shards.synth import phantom, write_dicom_series, write_nifti
from mim_scale.shards.verify import iter_shard_samples, verify_shards

SMALL = (8, 32, 32)

FAKE_TAGS = {
    "PatientName": "Doe^Johnathan",
    "PatientID": "PID884422",
    "PatientBirthDate": "19610412",
    "OtherPatientIDs": "OTHERID7731",
    "PatientAddress": "42 Wallaby Way Sydney",
    "InstitutionName": "Saint Elsewhere Hospital",
    "InstitutionAddress": "17 Cherry Tree Lane",
    "ReferringPhysicianName": "Welby^Marcus",
    "AccessionNumber": "ACC99887766",
    "StudyID": "STUDY4455",
    "StudyDate": "20190305",
    "StationName": "CTSTATION77",
    "DeviceSerialNumber": "SERIAL31337",
}
FAKE_UIDS = {"study": "1.2.826.0.1.3680043.10.999.4242001", "series": "1.2.826.0.1.3680043.10.999.4242002"}
FAKE_PATH_PARTS = ["Doe_Johnathan_PID884422", "19610412_CT_abdomen", "Doe_Johnathan_slice", "Smith_Alice_MRN55443322"]


def _nifti_set(folder: Path, n: int, shape=SMALL, seed: int = 100) -> Path:
    for i in range(n):
        write_nifti(phantom(shape, seed=seed + i), folder / f"v{i:02d}.nii.gz")
    return folder


def _scan_bytes(data: bytes, needles: list[bytes], where: str) -> list[str]:
    low = data.lower()
    return [f"{n.decode()} in {where}" for n in needles if n.lower() in low]


def _scan_tree(root: Path, needles: list[bytes]) -> list[str]:
    hits: list[str] = []
    for p in sorted(root.rglob("*")):
        hits += _scan_bytes(str(p.relative_to(root)).encode(), needles, f"name {p}")
        if not p.is_file():
            continue
        data = p.read_bytes()
        hits += _scan_bytes(data, needles, str(p))
        if p.suffix == ".gz":
            hits += _scan_bytes(gzip.decompress(data), needles, f"{p} (decompressed)")
        if tarfile.is_tarfile(p):
            with tarfile.open(p) as tar:
                for m in tar.getmembers():
                    hits += _scan_bytes(m.name.encode() + m.uname.encode() + m.gname.encode(), needles, f"{p}:{m.name} header")
                    member = tar.extractfile(m).read()
                    hits += _scan_bytes(member, needles, f"{p}:{m.name}")
                    if m.name.endswith(".gz"):
                        hits += _scan_bytes(gzip.decompress(member), needles, f"{p}:{m.name} (decompressed)")
    return hits


def test_no_identifying_value_reaches_the_shareable_set_or_the_logs(tmp_path, caplog, capsys):
    inp = tmp_path / "export"
    series_dir = inp / FAKE_PATH_PARTS[0] / FAKE_PATH_PARTS[1]
    write_dicom_series(
        phantom(SMALL, seed=1), series_dir, tags=FAKE_TAGS, series_uid=FAKE_UIDS["series"], study_uid=FAKE_UIDS["study"],
        file_name=lambda i: f"{FAKE_PATH_PARTS[2]}_{i:03d}.dcm",
    )
    # a broken file with an identifying name: its reject must stay private too
    (series_dir / "Doe_Johnathan_report.dcm").write_bytes(b"Doe^Johnathan PID884422 free text")
    write_nifti(phantom(SMALL, seed=2), inp / "Smith_Alice" / f"{FAKE_PATH_PARTS[3]}.nii.gz")
    out, private = tmp_path / "share", tmp_path / "private"
    caplog.set_level(logging.DEBUG)
    rc = cli_main(["shards", "build", f"hospital={inp}", "--out", str(out), "--private-dir", str(private), "--workers", "0"])
    assert rc == 0
    cap = capsys.readouterr()
    logs = caplog.text + cap.out + cap.err
    assert "2 volume(s)" in logs  # the logs were captured
    needles = [v.encode() for v in FAKE_TAGS.values()] + [v.encode() for v in FAKE_UIDS.values()]
    needles += [p.encode() for p in FAKE_PATH_PARTS] + [b"Johnathan", b"Elsewhere", b"Smith_Alice", b"MRN55443322"]
    needles += [str(inp).encode()]  # the private dir may be named in logs: it is where to look
    hits = _scan_tree(out, needles) + _scan_bytes(logs.encode(), needles, "logs")
    from prometheus_client import generate_latest

    hits += _scan_bytes(generate_latest(metrics.REGISTRY), needles, "metrics")
    assert not hits, hits
    # the private set does link back: that is its purpose
    linkage = (private / "linkage.jsonl").read_text()
    assert FAKE_PATH_PARTS[1] in linkage and FAKE_PATH_PARTS[3] in linkage
    assert "Doe_Johnathan_report.dcm" in (private / "rejects.jsonl").read_text()
    assert read_manifest(out)["num_samples"] == 2


def test_rerun_skips_completed_work_and_gives_an_identical_manifest(tmp_path):
    inp = _nifti_set(tmp_path / "in", 6)
    out = tmp_path / "out"
    first = build_shards([f"s={inp}"], out, workers=0, progress=False, target_shard_bytes=12_000)
    manifest = (out / "manifest.json").read_bytes()
    assert first.num_shards >= 3 and first.built_now == 6
    again = build_shards([f"s={inp}"], out, workers=0, progress=False, target_shard_bytes=12_000)
    assert again.built_now == 0 and again.resumed_items == 6
    assert (out / "manifest.json").read_bytes() == manifest
    # a lost shard is rebuilt, from that shard on, to the same bytes
    shards = read_manifest(out)["shards"]
    (out / shards[1]["url"]).unlink()
    third = build_shards([f"s={inp}"], out, workers=0, progress=False, target_shard_bytes=12_000)
    assert 0 < third.built_now < 6
    assert (out / "manifest.json").read_bytes() == manifest
    # same salt, fresh folders: the same bytes again (the build is deterministic)
    private2 = tmp_path / "p2"
    private2.mkdir()
    shutil.copy(out.with_name("out.private") / "salt.txt", private2 / "salt.txt")
    build_shards([f"s={inp}"], tmp_path / "out2", private_dir=private2, workers=0, progress=False, target_shard_bytes=12_000)
    assert (tmp_path / "out2" / "manifest.json").read_bytes() == manifest
    # changed inputs: rebuilt from scratch, not resumed into a stale plan
    write_nifti(phantom(SMALL, seed=999), inp / "new.nii.gz")
    fourth = build_shards([f"s={inp}"], out, workers=0, progress=False, target_shard_bytes=12_000)
    assert fourth.num_samples == 7 and fourth.resumed_items == 0
    assert verify_shards(out).ok


def test_kill_minus_9_mid_build_then_rerun_gives_a_complete_valid_set(tmp_path):
    inp = _nifti_set(tmp_path / "in", 24, shape=(24, 96, 96), seed=300)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mim_scale.shards.cli", "shards", "build", f"k={inp}", "--out", str(out), "--workers", "0",
           "--no-progress", "--target-shard-bytes", "60000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("shard-000001.tar")):
        assert proc.poll() is None, "the build finished before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    rep = verify_shards(out)
    assert rep.ok, rep.errors
    assert rep.samples == 24 and not list(out.glob("*.tmp"))
    journal = (out.with_name("out.private") / "journal.jsonl").read_text().splitlines()
    assert json.loads(journal[1])["shard"]["index"] == 0  # the shards done before the kill were kept
    # and the result equals an uninterrupted build with the same salt
    p2 = tmp_path / "p2"
    p2.mkdir()
    shutil.copy(out.with_name("out.private") / "salt.txt", p2 / "salt.txt")
    build_shards([f"k={inp}"], tmp_path / "ref", private_dir=p2, workers=0, progress=False, target_shard_bytes=60000)
    assert (tmp_path / "ref" / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()


def test_exclude_by_content_hash_and_by_key(tmp_path):
    inp = _nifti_set(tmp_path / "in", 3)
    out = tmp_path / "out"
    build_shards([f"s={inp}"], out, workers=0, progress=False)
    linkage = [json.loads(line) for line in (tmp_path / "out.private" / "linkage.jsonl").read_text().splitlines()]
    excl = tmp_path / "exclude.txt"
    excl.write_text(f"# benchmark volumes\n{linkage[0]['content_sha256']}\n{linkage[1]['key']}  # by key\n")
    rep = build_shards([f"s={inp}"], tmp_path / "out2", private_dir=tmp_path / "out.private", workers=0, progress=False, exclude=excl)
    assert rep.num_samples == 1 and rep.rejected == {"excluded": 2}
    (vol, meta), = [decode_sample(s) for s in iter_shard_samples(tmp_path / "out2" / "shard-000000.tar")]
    assert meta["key"] == linkage[2]["key"]


def test_metrics_count_built_rejected_and_bytes(tmp_path):
    inp = _nifti_set(tmp_path / "in", 2)
    (inp / "junk.nii").write_bytes(b"junk" * 100)

    def value(name, **labels):
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    before = (value("mim_shards_volumes_built_total"), value("mim_shards_volumes_rejected_total", reason="read_failed"),
              value("mim_shards_bytes_written_total"))
    rep = build_shards([str(inp)], tmp_path / "out", workers=0, progress=False)
    after = (value("mim_shards_volumes_built_total"), value("mim_shards_volumes_rejected_total", reason="read_failed"),
             value("mim_shards_bytes_written_total"))
    assert after[0] - before[0] == 2 and after[1] - before[1] == 1
    assert after[2] - before[2] == rep.shard_bytes
    assert "mim_shards_volumes_built_total" in (tmp_path / "out.private" / "metrics.prom").read_text()


def test_ray_build_equals_the_in_process_build(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from mim_scale.shards import builder

    monkeypatch.setattr(builder, "DISCOVER_CHUNK", 3)  # the 8-slice series is discovered by 3 tasks, then merged
    inp = _nifti_set(tmp_path / "in", 4)
    write_dicom_series(phantom(SMALL, seed=77), inp / "series")
    ref = build_shards([f"r={inp}"], tmp_path / "a", workers=0, progress=False, target_shard_bytes=15_000)
    p2 = tmp_path / "p2"
    p2.mkdir()
    shutil.copy(tmp_path / "a.private" / "salt.txt", p2 / "salt.txt")
    was_running = ray.is_initialized()
    rep = build_shards([f"r={inp}"], tmp_path / "b", private_dir=p2, workers=2, max_in_flight=2, progress=False,
                       target_shard_bytes=15_000)
    assert ray.is_initialized() == was_running  # started and stopped here, or reused and left running
    assert rep.num_samples == ref.num_samples == 5
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    assert rep.peak_worker_rss_bytes > 0


def test_enhanced_multiframe_ct_is_assembled_from_per_frame_positions():
    vol = load_series([get_testdata_file("eCT_Supplemental.dcm")], StackTolerances(min_slices=2))
    assert vol.array.shape == (2, 512, 512)
    assert vol.spacing[2] == pytest.approx(10.0)
    assert vol.array.min() == -1024  # RescaleIntercept from the functional groups applied


def test_cli_synth_build_verify_inspect_and_a_corrupted_shard(tmp_path, capsys):
    assert cli_main(["shards", "synth", "3", "--out", str(tmp_path / "syn"), "--shape", "16,48,48"]) == 0
    assert cli_main(["shards", "synth", "1", "--out", str(tmp_path / "syn_dcm"), "--format", "dicom", "--shape", "12,40,40"]) == 0
    assert len(list((tmp_path / "syn_dcm").rglob("*.dcm"))) == 12
    assert cli_main(["shards", "build", f"a={tmp_path / 'syn'}", f"b={tmp_path / 'syn_dcm'}", "--out", str(tmp_path / "o"),
                     "--workers", "0", "--no-progress"]) == 0
    assert cli_main(["shards", "verify", str(tmp_path / "o")]) == 0
    assert "OK: 1 shard(s), 4 sample(s)" in capsys.readouterr().out
    assert cli_main(["shards", "inspect", str(tmp_path / "o"), "--png", str(tmp_path / "m.png")]) == 0
    table = capsys.readouterr().out
    assert "\na " in table and "\nb " in table and (tmp_path / "m.png").stat().st_size > 1000
    shard = tmp_path / "o" / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert cli_main(["shards", "verify", str(tmp_path / "o")]) == 1
    assert "sha256 mismatch" in capsys.readouterr().out
    assert cli_main(["shards", "build", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_phantom_is_hu_realistic():
    vol = phantom((32, 64, 64), seed=3)
    assert vol.dtype == np.int16
    for lo, hi in ((-1024, -950), (-900, -800), (-130, -70), (20, 70), (150, 200), (800, 1000)):
        assert ((vol >= lo) & (vol <= hi)).sum() > 50, (lo, hi)


def test_build_config_is_validated():
    with pytest.raises(Exception, match="spacing"):
        BuildConfig(spacing=0.0)
    with pytest.raises(Exception, match="codec"):
        BuildConfig(codec="zip")


def test_a_second_build_into_the_same_folder_is_refused_while_one_runs(tmp_path):
    import fcntl

    from mim_scale.errors import UserFacingError

    inp = _nifti_set(tmp_path / "in", 1)
    private = tmp_path / "out.private"
    private.mkdir()
    with open(private / "build.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserFacingError, match="another build"):
            build_shards([str(inp)], tmp_path / "out", workers=0, progress=False)
    assert build_shards([str(inp)], tmp_path / "out", workers=0, progress=False).num_samples == 1


@pytest.mark.slow
def test_scale_build_of_synthetic_dicom_and_nifti_on_ray(tmp_path):
    """Scale check (outside CI): 32 phantoms, half as DICOM series, built on a 2-CPU Ray cluster."""
    from mim_scale.shards.synth import write_collection

    write_collection(tmp_path / "dcm", 16, "dicom", shape=(48, 128, 128), seed=500)
    write_collection(tmp_path / "nii", 16, "nifti", shape=(48, 128, 128), seed=600)
    rep = build_shards([f"d={tmp_path / 'dcm'}", f"n={tmp_path / 'nii'}"], tmp_path / "out", workers=2,
                       progress=False, target_shard_bytes=4 << 20)
    assert rep.num_samples == 32 and rep.rejected == {} and rep.num_shards > 1
    assert verify_shards(tmp_path / "out").ok


def test_metrics_are_served_over_http_and_progress_shows_throughput(tmp_path, capsys):
    import urllib.request

    port = metrics.start_server(0)
    inp = _nifti_set(tmp_path / "in", 2)
    build_shards([str(inp)], tmp_path / "out", workers=0, progress=True)
    err = capsys.readouterr().err
    assert "vol/min" in err and "built=2 rejected=0" in err
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "mim_shards_volumes_built_total" in body and "mim_shards_bytes_written_total" in body


def test_the_project_cli_lists_the_shards_subcommands(capsys):
    from mim_scale.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["shards", "--help"])
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("build", "verify", "inspect", "synth"))
