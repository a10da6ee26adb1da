"""Where exports live: a local folder or an ``s3://bucket/prefix/NAME`` prefix, checked by ``SHA256SUMS``.

``SHA256SUMS`` (``sha256sum`` format: ``<64 hex>  <relative path>`` per line) is the one index that says an
export is complete: writers put every other file first and ``SHA256SUMS`` last, and readers verify every
listed file against it before reading any of them. Files an export folder holds but does not list (a Hub
download's ``.gitattributes`` or ``.cache/``, a catalogue's ``evaluate.json``) are never read by the loader.

- :func:`verified_folder`: a local folder, or a remote export pulled into the local cache, verified: the
  path the loader may read.
- :func:`publish_folder`: a finished local folder -> its destination (local: atomic rename; S3: files
  first, stale objects removed, ``SHA256SUMS`` last).
- :func:`list_exports`: the exports under a folder or an ``s3://`` prefix (for ``mim-scale models``).

The pull cache is ``$MIM_SCALE_CACHE/exports/<sha256 of SHA256SUMS>/`` (default ``~/.cache/mim-scale``):
two URIs holding the same bytes share one copy, and a changed export (new SHA256SUMS) is a new entry.
Everything read from a store is hostile: names are checked to stay inside the export, sizes are bounded
before anything is allocated or downloaded, and a hash mismatch names the file.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from mim_scale.errors import UserFacingError
from mim_scale.fileutil import fsync_dir, sha256_file

SUMS_FILE = "SHA256SUMS"
MAX_SUMS_BYTES = 1 << 20  # an index of a few files; anything larger is not ours
MAX_JSON_BYTES = 16 << 20  # config.json, metadata, evaluation reports
MAX_ENTRIES = 1000
_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


class ExportIntegrityError(UserFacingError):
    """A partial, tampered or malformed export; the message names the file and the reason."""


def is_remote(location: str | os.PathLike) -> bool:
    return str(location).startswith("s3://")


def join(location: str, *names: str) -> str:
    """``location`` / names, for a local path or an ``s3://`` URI alike."""
    if is_remote(location):
        return "/".join([location.rstrip("/"), *names])
    return str(Path(location, *names))


def _split(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, "prefix" without slashes at either end; may be empty)."""
    rest = uri[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise UserFacingError(f"{uri!r} is not an s3://bucket/prefix URI")
    return bucket, prefix.strip("/")


def _client():
    try:
        from mim_scale.data.s3cat import client
    except ModuleNotFoundError as exc:  # boto3 is the s3 extra
        raise UserFacingError("s3:// locations need boto3: pip install 'mim-scale[s3]'") from exc
    return client()


def check_name(name: str, where: str) -> str:
    """A listed file name: relative, POSIX, no ``..``, no empty or hidden-special parts."""
    p = PurePosixPath(name)
    if (not name or name.startswith("/") or "\\" in name or "\x00" in name or p.is_absolute()
            or any(part in ("", ".", "..") for part in name.split("/"))):
        raise ExportIntegrityError(f"{where}: {name!r} is not a plain relative file name inside the export")
    return name


def parse_sums(text: bytes, where: str) -> dict[str, str]:
    """``SHA256SUMS`` bytes -> {relative name: hex sha256}; malformed lines are an error naming the line."""
    if len(text) > MAX_SUMS_BYTES:
        raise ExportIntegrityError(f"{where}: {len(text)} bytes, more than an export index may hold ({MAX_SUMS_BYTES})")
    try:
        lines = text.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ExportIntegrityError(f"{where}: not UTF-8 text ({exc})") from exc
    sums: dict[str, str] = {}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        m = _LINE.match(line)
        if not m:
            raise ExportIntegrityError(f"{where}: line {i} is not '<sha256>  <file>': {line[:80]!r}")
        name = check_name(m.group(2), f"{where} line {i}")
        if name == SUMS_FILE or name in sums:
            raise ExportIntegrityError(f"{where}: line {i} lists {name!r} twice or lists the index itself")
        sums[name] = m.group(1)
    if not sums or len(sums) > MAX_ENTRIES:
        raise ExportIntegrityError(f"{where}: lists {len(sums)} files (expected 1..{MAX_ENTRIES})")
    return sums


def format_sums(sums: dict[str, str]) -> str:
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items()))


def write_sums(folder: Path) -> dict[str, str]:
    """Hash every file under ``folder`` (recursively) into ``folder/SHA256SUMS``; written last by the caller."""
    sums = {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != SUMS_FILE}
    (folder / SUMS_FILE).write_text(format_sums(sums))
    return sums


# -- durable folders (fsync, rename) -------------------------------------------------------------

def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory under ``root`` (files first, then their folders, deepest first)."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def replace_folder(tmp: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Move the finished folder ``tmp`` to ``dest``, replacing whatever ``dest`` held; nothing stale survives.

    ``tmp`` must be a sibling of ``dest`` (same file system). The old folder is renamed aside, the new one
    renamed into place, the parent fsynced, then the old one deleted: a crash leaves either the old
    folder, or the new one, or (between the two renames) none plus ``.NAME.old-PID`` beside it, never a mix.
    """
    tmp, dest = Path(tmp), Path(dest)
    fsync_tree(tmp)
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.rename(dest, old)
    os.rename(tmp, dest)
    fsync_dir(dest.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
        fsync_dir(dest.parent)



# -- verification -------------------------------------------------------------------------------------


def verify_folder(folder: Path) -> dict[str, str]:
    """Check every file ``folder/SHA256SUMS`` lists; returns the listing. Raises naming the first bad file.

    Listed files may be symlinks (the Hugging Face cache's ``snapshots/<rev>/`` layout points into
    ``blobs/``) but must resolve to regular files: a hash cannot be forged, so where they point only
    decides whether the check passes.
    """
    folder = Path(folder)
    sums_path = folder / SUMS_FILE
    if not sums_path.is_file():
        raise ExportIntegrityError(f"{folder}: no {SUMS_FILE}: not an export, or an incomplete one "
                                   f"({SUMS_FILE} is written last)")
    sums = parse_sums(_read_bounded(sums_path, MAX_SUMS_BYTES), str(sums_path))
    for name, digest in sums.items():
        path = folder / name
        if not path.exists():
            raise ExportIntegrityError(f"{path}: listed in {SUMS_FILE} but missing (a partial export)")
        if not path.resolve().is_file():
            raise ExportIntegrityError(f"{path}: listed in {SUMS_FILE} but not a regular file")
        actual = sha256_file(path)
        if actual != digest:
            raise ExportIntegrityError(f"{path}: sha256 {actual[:16]}... does not match {SUMS_FILE} "
                                       f"({digest[:16]}...): tampered with or partly written")
    return sums


def _read_bounded(path: Path, limit: int) -> bytes:
    size = path.stat().st_size
    if size > limit:
        raise ExportIntegrityError(f"{path}: {size} bytes, more than the {limit} this file may hold")
    return path.read_bytes()


def cache_root() -> Path:
    return Path(os.environ.get("MIM_SCALE_CACHE", Path.home() / ".cache" / "mim-scale")) / "exports"


def verified_folder(location: str | os.PathLike, cache: Path | None = None) -> Path:
    """The local folder of a verified export: ``location`` itself, or its copy pulled into the cache."""
    if is_remote(location):
        return pull(str(location), cache)
    folder = Path(location)
    if not folder.is_dir():
        raise UserFacingError(f"{folder}: no such export folder")
    verify_folder(folder)
    return folder


def pull(uri: str, cache: Path | None = None) -> Path:
    """Download the export at ``uri`` into ``cache/<sha256 of its SHA256SUMS>/`` (once), verify, return it."""
    bucket, prefix = _split(uri)
    s3 = _client()
    sums_uri = join(uri, SUMS_FILE)
    sums_bytes = _get_small(s3, bucket, f"{prefix}/{SUMS_FILE}".lstrip("/"), sums_uri, MAX_SUMS_BYTES,
                            missing=f"{uri}: no {SUMS_FILE}: not an export, or an incomplete one "
                                    f"({SUMS_FILE} is written last)")
    sums = parse_sums(sums_bytes, sums_uri)
    root = Path(cache) if cache is not None else cache_root()
    dest = root / hashlib.sha256(sums_bytes).hexdigest()
    if dest.is_dir():
        try:
            verify_folder(dest)  # the cache is a local folder like any other: checked on every load
            return dest
        except ExportIntegrityError as exc:  # changed on this disk since it was pulled: pull it again
            import logging

            logging.getLogger(__name__).warning("%s; pulling %s again", exc, uri)
            shutil.rmtree(dest)
    # sizes first: every listed object must exist, and all of them must fit on the disk
    sizes: dict[str, int] = {}
    for name in sums:
        key = f"{prefix}/{name}".lstrip("/")
        try:
            sizes[name] = int(s3.head_object(Bucket=bucket, Key=key)["ContentLength"])
        except Exception as exc:  # noqa: BLE001 - botocore's ClientError for 404, anything else alike
            raise ExportIntegrityError(f"{join(uri, name)}: listed in {SUMS_FILE} but cannot be read "
                                       f"(a partial export?): {exc}") from exc
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if sum(sizes.values()) > free:
        raise UserFacingError(f"{uri}: {sum(sizes.values())} bytes do not fit in the {free} free under {root}")
    tmp = root / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name, digest in sums.items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            _download_checked(s3, bucket, f"{prefix}/{name}".lstrip("/"), target, sizes[name], digest,
                              join(uri, name))
        (tmp / SUMS_FILE).write_bytes(sums_bytes)  # the index last, as on the store
        if dest.is_dir():  # another process pulled the same export meanwhile
            shutil.rmtree(tmp)
        else:
            fsync_tree(tmp)
            try:
                os.rename(tmp, dest)
            except OSError:
                if not dest.is_dir():
                    raise
                shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    verify_folder(dest)
    return dest


def _get_small(s3, bucket: str, key: str, where: str, limit: int, missing: str) -> bytes:
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except Exception as exc:  # noqa: BLE001
        raise ExportIntegrityError(f"{missing} ({exc})") from exc
    if int(head["ContentLength"]) > limit:
        raise ExportIntegrityError(f"{where}: {head['ContentLength']} bytes, more than the {limit} it may hold")
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read(limit + 1)
    if len(body) > limit:
        raise ExportIntegrityError(f"{where}: more than the {limit} bytes it may hold")
    return body


def _download_checked(s3, bucket: str, key: str, target: Path, size: int, digest: str, where: str) -> None:
    """Stream one object to ``target``, hashing as it comes; no more than ``size`` bytes are accepted."""
    h = hashlib.sha256()
    got = 0
    body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    with open(target, "wb") as f:
        while chunk := body.read(1 << 20):
            got += len(chunk)
            if got > size:
                raise ExportIntegrityError(f"{where}: more bytes than its {size} announced")
            h.update(chunk)
            f.write(chunk)
    if h.hexdigest() != digest:
        raise ExportIntegrityError(f"{where}: sha256 {h.hexdigest()[:16]}... does not match {SUMS_FILE} "
                                   f"({digest[:16]}...): tampered with or partly written")


# -- publishing ---------------------------------------------------------------------------------------


# what an export may hold: anything else at a destination means it is not (only) an old export of ours
_EXPORT_FILES = {SUMS_FILE, "README.md", "config.json", "encoder.safetensors", "mim_full.safetensors",
                 "evaluation.json"}
_EXPORT_FOLDERS = ("configs/", "models/", "docs/")  # a MONAI bundle's


def check_replaceable(names: list[str], where: str) -> None:
    """Refuse to overwrite a destination that holds anything but an (old or partial) export: other exports
    below it, or files no export writes (a home folder, a shard prefix, a typo)."""
    for name in names:
        if name.endswith("/" + SUMS_FILE):
            raise UserFacingError(f"{where}: holds another export ({name}); export to a location of its own, "
                                  "e.g. .../NAME")
    if SUMS_FILE in names:
        return  # an old export: replaced whole
    strange = [n for n in names if n not in _EXPORT_FILES and not n.startswith(_EXPORT_FOLDERS)]
    if strange:
        raise UserFacingError(f"{where}: not an export (no {SUMS_FILE}) and holds {strange[0]!r}"
                              f"{f' and {len(strange) - 1} more' if len(strange) > 1 else ''}; "
                              "choose a new or empty location")


def publish_folder(tmp: Path, dest: str | os.PathLike) -> str:
    """Move the finished export ``tmp`` (with its ``SHA256SUMS``) to ``dest``; returns ``dest`` as a string.

    Local: ``tmp`` is a sibling of ``dest``; fsynced and renamed into place (no stale file survives).
    S3: the old index is deleted first (readers see 'incomplete', never a mix), every file is uploaded,
    objects under the prefix that the new export does not list are deleted, and ``SHA256SUMS`` goes last.
    """
    if not is_remote(dest):
        dest = Path(dest)
        if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
            raise UserFacingError(f"{dest}: exists and is not a folder; choose a new or empty location")
        if dest.is_dir():
            check_replaceable([p.relative_to(dest).as_posix() for p in dest.rglob("*") if not p.is_dir()], str(dest))
        replace_folder(tmp, dest)
        return str(dest)
    uri = str(dest).rstrip("/")
    bucket, prefix = _split(uri)
    if not prefix:
        raise UserFacingError(f"{uri}: give a prefix for the export (s3://bucket/prefix/NAME), not a bare bucket")
    s3 = _client()
    sums = parse_sums((tmp / SUMS_FILE).read_bytes(), str(tmp / SUMS_FILE))
    check_replaceable([o["Key"][len(prefix) + 1:] for o in _objects(s3, bucket, prefix + "/")], uri)
    s3.delete_object(Bucket=bucket, Key=f"{prefix}/{SUMS_FILE}")
    for name in sorted(sums):
        s3.upload_file(str(tmp / name), bucket, f"{prefix}/{name}")
    keep = {f"{prefix}/{name}" for name in sums}
    for obj in _objects(s3, bucket, prefix + "/"):
        if obj["Key"] not in keep:
            s3.delete_object(Bucket=bucket, Key=obj["Key"])
    s3.upload_file(str(tmp / SUMS_FILE), bucket, f"{prefix}/{SUMS_FILE}")
    shutil.rmtree(tmp, ignore_errors=True)
    return uri


def _objects(s3, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        yield from page.get("Contents", [])


# -- listing ------------------------------------------------------------------------------------------


@dataclass
class ExportEntry:
    """One complete export found under a location (its ``SHA256SUMS`` exists)."""

    name: str
    location: str  # local folder or s3:// URI
    size_bytes: int  # sum of the listed files
    files: dict[str, str]  # the SHA256SUMS listing


def read_small(location: str, name: str, limit: int = MAX_JSON_BYTES) -> bytes | None:
    """A small file of an export or beside it, at most ``limit`` bytes; None when absent (or too large)."""
    try:
        if is_remote(location):
            bucket, key = _split(join(location, name))
            return _get_small(_client(), bucket, key, join(location, name), limit, missing="absent")
        path = Path(location, name)
        return _read_bounded(path, limit) if path.is_file() else None
    except ExportIntegrityError:
        return None


def read_json_file(location: str, name: str) -> Any:
    """A small JSON file of an export or beside it (bounded); None when absent or unreadable."""
    import json

    data = read_small(location, name)
    try:
        return None if data is None else json.loads(data)
    except ValueError:
        return None


def list_exports(location: str | os.PathLike, max_depth: int = 3) -> list[ExportEntry]:
    """Every export (a folder / prefix holding ``SHA256SUMS``) at or under ``location``, by name.

    Sizes come from the file system or the object listing; nothing here verifies hashes (the loader does).
    Folders whose name starts with '.' (temporary and cache folders) are skipped.
    """
    location = str(location)
    out: list[ExportEntry] = []
    if is_remote(location):
        bucket, prefix = _split(location)
        s3 = _client()
        base = prefix + "/" if prefix else ""
        objects = list(_objects(s3, bucket, base))
        sizes = {o["Key"]: int(o["Size"]) for o in objects}
        for key in sorted(sizes):
            rel = key[len(base):]
            parts = rel.split("/")
            if parts[-1] != SUMS_FILE or len(parts) - 1 > max_depth or any(p.startswith(".") for p in parts[:-1]):
                continue
            folder = key[: -len(SUMS_FILE)].rstrip("/")
            uri = f"s3://{bucket}/{folder}"
            try:
                sums = parse_sums(_get_small(s3, bucket, key, f"s3://{bucket}/{key}", MAX_SUMS_BYTES, "absent"),
                                  f"s3://{bucket}/{key}")
            except ExportIntegrityError:
                continue
            size = sum(sizes.get(f"{folder}/{n}", 0) for n in sums)
            out.append(ExportEntry(folder.rsplit("/", 1)[-1] or bucket, uri, size, sums))
        return out
    root = Path(location)
    if not root.is_dir():
        raise UserFacingError(f"{root}: no such folder")
    for sums_path in sorted(_local_sums(root, max_depth)):
        folder = sums_path.parent
        try:
            sums = parse_sums(_read_bounded(sums_path, MAX_SUMS_BYTES), str(sums_path))
        except ExportIntegrityError:
            continue
        size = sum((folder / n).stat().st_size for n in sums if (folder / n).is_file())
        out.append(ExportEntry(folder.name, str(folder), size, sums))
    return out


def _local_sums(root: Path, max_depth: int) -> Iterator[Path]:
    if (root / SUMS_FILE).is_file():
        yield root / SUMS_FILE
        return  # an export's own subfolders (a bundle's configs/) are not exports
    if max_depth <= 0:
        return
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.name.startswith(".") and not child.is_symlink():
            yield from _local_sums(child, max_depth - 1)
