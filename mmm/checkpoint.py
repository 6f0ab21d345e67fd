"""One checkpoint format for stage 1 -> stage 2 -> serve, in Hugging Face layout.

    <dir>/mmm.json             {"format": 1, "phase": ..., "config": ModelConfig as dict}
    <dir>/llm/                 the causal LM (save_pretrained; LoRA and trained token rows merged in)
    <dir>/vision/, <dir>/audio/   the frozen encoders and their processors
    <dir>/projectors.safetensors  both projectors, with their feature-standardisation buffers,
                               and the item-number vectors where the config has them
    <dir>/tokenizer/           the tokenizer with MMM's tokens and chat template

Phases are named so a stage refuses a checkpoint of the wrong phase with a clear message
(LLaVA's users lost projectors between stages when this was implicit).

A checkpoint may also be read from an fsspec URL (``s3://bucket/run/final``): it is copied to a
temporary folder, loaded, and the copy removed. ``storage_options`` are fsspec's keyword
arguments for that filesystem; for S3 through s3fs, ``{"key": ..., "secret": ..., "client_kwargs":
{"endpoint_url": "http://127.0.0.1:9000", "region_name": "us-east-1"}}``. Jobs build them from
their storage config (``pipelines.storage.StorageConfig.storage_options()``); None uses s3fs's own
defaults (AWS environment variables, an instance role).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from . import lora
from .files import readable_as_umask_allows

PHASES = ("init", "stage1", "stage2")
FORMAT = 1
META = "mmm.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or of the wrong phase."""


def save(model, path: str, phase: str) -> None:
    from safetensors.torch import save_file

    if phase not in PHASES:
        raise CheckpointError(f"unknown phase {phase!r}; phases are {PHASES}")
    if "://" in path:
        raise CheckpointError(f"save_pretrained writes a local folder, not {path}: save locally, then upload the "
                              "folder (the training jobs do, to an s3:// run.output_dir)")
    os.makedirs(path, exist_ok=True)
    if os.path.exists(os.path.join(path, META)):  # a save over an older one: incomplete until its own META
        os.remove(os.path.join(path, META))
    lora.merged(model.llm).save_pretrained(os.path.join(path, "llm"))
    model.vision.tower.save_pretrained(os.path.join(path, "vision"))
    model.vision.processor.save_pretrained(os.path.join(path, "vision"))
    model.audio.encoder.save_pretrained(os.path.join(path, "audio"))
    model.audio.extractor.save_pretrained(os.path.join(path, "audio"))
    model.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
    state = {f"{name}.{k}": v for name, part in model.projector_parts().items() for k, v in part.state_dict().items()}
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, os.path.join(path, "projectors.safetensors"))
    readable_as_umask_allows(path)
    with open(os.path.join(path, META), "w") as f:  # written last: its presence means complete
        json.dump({"format": FORMAT, "phase": phase, "config": model.config.to_dict()}, f, indent=2)
    model.phase = phase


def read_meta(path: str) -> dict:
    meta_path = os.path.join(path, META)
    if not os.path.exists(meta_path):
        raise CheckpointError(f"{path} is not an MMM checkpoint (no {META}; an interrupted save leaves none)")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("phase") not in PHASES:
        raise CheckpointError(f"{meta_path}: unsupported format {meta.get('format')} / phase {meta.get('phase')}")
    return meta


def check_phase(path: str, phase: str, expect) -> None:
    allowed = (expect,) if isinstance(expect, str) else tuple(expect)
    if phase not in allowed:
        raise CheckpointError(f"checkpoint {path} is from phase {phase!r}, but this step needs one of {allowed}")


def load(cls, path: str, expect_phase=None, storage_options: dict[str, Any] | None = None):
    """Load a checkpoint (local directory, or s3:// prefix read with ``storage_options``) into ``cls``."""
    local = localize(path, storage_options)
    try:
        return _load_local(cls, local, path, expect_phase)
    finally:
        if local != path:
            shutil.rmtree(local, ignore_errors=True)


def _load_local(cls, local: str, path: str, expect_phase):
    from safetensors.torch import load_file

    from .config import ModelConfig
    from .encoders import AudioEncoder, VisionEncoder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = read_meta(local)
    if expect_phase is not None:
        check_phase(path, meta["phase"], expect_phase)
    config = ModelConfig.from_dict(upgraded(meta["config"]))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(local, "tokenizer"))
    llm = AutoModelForCausalLM.from_pretrained(os.path.join(local, "llm"))
    vision = VisionEncoder(config.vision, config.seed, weights=os.path.join(local, "vision"))
    audio = AudioEncoder(config.audio, config.seed, weights=os.path.join(local, "audio"))
    model = cls(config, tokenizer, vision, audio, llm, phase=meta["phase"])
    state = load_file(os.path.join(local, "projectors.safetensors"))
    for name, part in model.projector_parts().items():
        prefix = name + "."
        part.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return model


def upgraded(config: dict) -> dict:
    """A saved config with the fields added since format 1 began, valued as the code that wrote it
    behaved: before ``projector.audio_norm_per_position`` existed, audio was standardised per
    position (so an older stage-1 checkpoint still loads into stage 2)."""
    projector = dict(config.get("projector", {}))
    projector.setdefault("audio_norm_per_position", True)
    return {**config, "projector": projector}


def localize(path: str, storage_options: dict[str, Any] | None = None) -> str:
    """s3:// (or any fsspec URL) -> a local copy, read with ``storage_options``; local paths pass through."""
    if "://" not in path:
        return path
    import fsspec

    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    root = root.rstrip("/")
    if not fs.exists(f"{root}/{META}"):
        raise CheckpointError(f"{path} is not an MMM checkpoint (no {META} there; an interrupted save leaves none)")
    target = tempfile.mkdtemp(prefix="mmm-ckpt-")
    fs.get(root + "/", target, recursive=True)
    return target
