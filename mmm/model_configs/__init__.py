"""The public ``config.json`` of each checkpoint the real presets name, kept in the repo.

They let the planner (mmm/meta.py, jobs/plan.py) build the paper's models at full size on the
meta device with no hub and no weights. Values are copied from each model's hub page; the
generation-only lists of Whisper's config (``suppress_tokens``, ``begin_suppress_tokens``,
``forced_decoder_ids``) are left out: they change no parameter and no activation. Nothing here is
used when the checkpoint itself can be loaded: that checkpoint's own config wins.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
FILES = {
    "google/siglip-base-patch16-384": "siglip-base-patch16-384.json",
    "openai/whisper-small": "whisper-small.json",
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": "tinyllama-1.1b-chat-v1.0.json",
    "mistralai/Mistral-7B-Instruct-v0.2": "mistral-7b-instruct-v0.2.json",
}


def public_config(name: str) -> dict:
    """The kept config.json of hub checkpoint ``name`` as a dict."""
    if name not in FILES:
        raise KeyError(f"no kept config for {name!r}; the repo keeps {sorted(FILES)} (mmm/model_configs/)")
    return json.loads((HERE / FILES[name]).read_text())


def hf_config(name: str):
    """The transformers config object of ``name`` (SigLIP gives its vision part, what MMM uses)."""
    from transformers import AutoConfig

    d = public_config(name)
    model_type = d.pop("model_type")
    if model_type == "siglip":
        from transformers import SiglipVisionConfig

        return SiglipVisionConfig(**d["vision_config"])
    return AutoConfig.for_model(model_type, **d)
