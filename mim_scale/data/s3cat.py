"""Stream one S3 object to stdout, for WebDataset ``pipe:`` shard URLs::

    python -m mim_scale.data.s3cat s3://bucket/prefix/shard-000000.tar

The endpoint and credentials come from boto3's usual environment (``AWS_ENDPOINT_URL`` for S3-compatible
stores such as MinIO, Ceph or moto; ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_DEFAULT_REGION``). Loader processes inherit it. Errors go to stderr with the URL and a non-zero
exit status, which WebDataset reports as a failed shard (skipped and counted by the stream).
"""

from __future__ import annotations

import shlex
import sys
from urllib.parse import urlparse

CHUNK = 1 << 20


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key); raises ValueError for anything else."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc or not parsed.path.strip("/"):
        raise ValueError(f"{url!r} is not an s3://bucket/key URL")
    return parsed.netloc, parsed.path.lstrip("/")


def client():
    import boto3

    return boto3.client("s3")


def read_object(url: str) -> bytes:
    """The whole object (for small files such as a manifest)."""
    bucket, key = split_s3_url(url)
    return client().get_object(Bucket=bucket, Key=key)["Body"].read()


def pipe_url(url: str) -> str:
    """The WebDataset ``pipe:`` URL that streams ``url`` through this module."""
    split_s3_url(url)
    return f"pipe:{shlex.quote(sys.executable)} -m mim_scale.data.s3cat {shlex.quote(url)}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m mim_scale.data.s3cat s3://bucket/key", file=sys.stderr)
        return 2
    try:
        bucket, key = split_s3_url(args[0])
        body = client().get_object(Bucket=bucket, Key=key)["Body"]
        out = sys.stdout.buffer
        while chunk := body.read(CHUNK):
            out.write(chunk)
        out.flush()
    except BrokenPipeError:  # the reader stopped early (for example a resume skipping members)
        return 0
    except Exception as exc:  # noqa: BLE001 - one line on stderr, non-zero status, for any failure
        print(f"s3cat: {args[0]}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
