"""Local-or-S3 paths for training outputs, through pyarrow's filesystems (what Ray Train uses).

A path is either a local folder (made absolute, since Ray workers run in other directories) or
``s3://bucket/prefix``. ``endpoint`` points S3 at an S3-compatible server (tests: moto on
127.0.0.1); credentials come from the usual AWS environment variables.
"""

from __future__ import annotations

import os

import pyarrow.fs as pafs


def is_remote(path: str) -> bool:
    return "://" in path


def resolve(path: str, endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or URI."""
    if not is_remote(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    if endpoint and path.startswith("s3://"):
        scheme = "https" if endpoint.startswith("https") else "http"
        host = endpoint.split("://", 1)[-1]
        fs = pafs.S3FileSystem(endpoint_override=host, scheme=scheme, region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
        return fs, path[len("s3://"):].rstrip("/")
    return pafs.FileSystem.from_uri(path)


def exists(path: str, endpoint: str | None = None) -> bool:
    fs, p = resolve(path, endpoint)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def listdir(path: str, endpoint: str | None = None) -> list[str]:
    """Names directly under ``path`` (empty when it does not exist)."""
    fs, p = resolve(path, endpoint)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return []
    return [os.path.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(p))]


def upload_dir(local_dir: str, dest: str, endpoint: str | None = None) -> None:
    """Copy a local folder to ``dest`` (local or remote), creating it."""
    fs, p = resolve(dest, endpoint)
    src = os.path.abspath(local_dir)
    if isinstance(fs, pafs.LocalFileSystem) and os.path.abspath(p) == src:
        return
    fs.create_dir(p, recursive=True)
    pafs.copy_files(src, p, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
