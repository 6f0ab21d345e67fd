"""Where tables and media live: a local path or an ``s3://`` URI, through one fsspec filesystem.

Every stage and job builds its filesystem from a :class:`StorageConfig` (plain data, so it pickles
to Ray workers; the filesystem itself is built in each worker's ``__init__``). Writes that others
may read concurrently go through :func:`write_parquet_atomic`: the file is written under a
``_tmp/`` folder and then moved into place, so a reader (or a crash) never sees half a file.
Readers skip names starting with ``_`` or ``.``, which is pyarrow's default for datasets.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq


@dataclass
class StorageConfig:
    """How to reach object storage; local paths ignore all of it."""

    endpoint_url: str | None = None
    """An S3-compatible server (MinIO, moto, Ceph); None means AWS itself."""
    key: str | None = None
    """Access key; None lets s3fs find credentials the usual way (env vars, instance role)."""
    secret: str | None = None
    region: str = "us-east-1"
    """moto and MinIO accept any region; AWS needs the bucket's."""

    def storage_options(self) -> dict:
        """fsspec/s3fs keyword arguments for the same storage (what ``MMMModel.from_pretrained`` takes)."""
        client = {"region_name": self.region}
        if self.endpoint_url:
            client["endpoint_url"] = self.endpoint_url
        return {"key": self.key, "secret": self.secret, "client_kwargs": client}

    def filesystem(self, uri: str):
        """The fsspec filesystem for ``uri`` and the path inside it (no scheme)."""
        if uri.startswith("s3://"):
            import s3fs

            fs = s3fs.S3FileSystem(**self.storage_options())
            return fs, uri[len("s3://") :].rstrip("/")
        from fsspec.core import url_to_fs

        # url_to_fs makes a local path absolute and drops a file:// scheme.
        fs, path = url_to_fs(uri, auto_mkdir=True)
        return fs, path.rstrip("/") or "/"


def join(root: str, *parts: str) -> str:
    """Join URI/path pieces with ``/`` (works for ``s3://bucket/x`` and local paths alike)."""
    return posixpath.join(root.rstrip("/"), *parts)


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> str:
    """A local uri as the OS reads it (``file://`` dropped, ``~`` expanded); remote uris as they are."""
    return uri if is_remote(uri) else os.path.expanduser(uri.removeprefix("file://"))


def write_parquet_atomic(fs, table: pa.Table, path: str) -> None:
    """Write ``table`` to ``path`` so that the file appears complete or not at all.

    Local: write under ``<dir>/_tmp/`` and rename (atomic on one filesystem). S3: an object only
    becomes visible once its upload completes, and the move is a server-side copy, so the same
    code is atomic per object there too.
    """
    folder, name = posixpath.split(path)
    tmp = posixpath.join(folder, "_tmp", f"{name}.{uuid.uuid4().hex}")
    fs.makedirs(posixpath.dirname(tmp), exist_ok=True)
    pq.write_table(table, tmp, filesystem=fs, compression="zstd")
    fs.mv(tmp, path)


def replace_folder(fs, staged: str, final: str) -> None:
    """Make ``final`` hold exactly the files of ``staged`` (moved file by file: S3 has no folders).

    Old files go first, then each new file is moved in; every move is atomic, the swap as a
    whole is not (a crash in between leaves fewer files, and the rerun writes them all again).
    """
    if fs.exists(final):
        fs.rm(final, recursive=True)
    for path in _visible_files(fs, staged) if fs.exists(staged) else []:
        fs.mv(path, posixpath.join(final, posixpath.relpath(path, staged)))
    if fs.exists(staged):
        fs.rm(staged, recursive=True)


def read_parquet(fs, path: str, columns: list[str] | None = None, schema: pa.Schema | None = None) -> pa.Table | None:
    """A Parquet file or folder as one table; None when nothing is there yet."""
    if not fs.exists(path):
        return None
    if fs.isdir(path) and not [p for p in _visible_files(fs, path) if p.endswith(".parquet")]:
        return None
    return pq.read_table(path, filesystem=fs, columns=columns, schema=schema)


def _visible_files(fs, root: str, hidden: tuple[str, ...] = ("_", ".")) -> list[str]:
    """Files under ``root`` whose path (below root) has no component starting with ``hidden``: a
    store's own ``_tmp/`` and ``_SUCCESS`` by default."""
    out = []
    for p in fs.find(root):
        rel = posixpath.relpath(p, root)
        if not any(c.startswith(hidden) for c in rel.split("/")):
            out.append(p)
    return sorted(out)


def list_files(fs, root: str) -> list[str]:
    """Every file under a folder or prefix of the user's media, sorted; hidden ones (``.DS_Store``,
    ``.git/``) skipped, ``_``-prefixed ones kept (cameras name photos ``_DSC0001.JPG``)."""
    return _visible_files(fs, root, hidden=(".",))


def uri_of(fs, path: str, like: str) -> str:
    """Put the scheme of ``like`` back on a filesystem path."""
    return f"s3://{path}" if like.startswith("s3://") else path
