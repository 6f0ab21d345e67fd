"""Encoder names key the feature store, so they depend on what the checkpoint is, not on how it
was named: two folders holding the same checkpoint, and an MMM checkpoint saved and reloaded, give
the same name; another size gives another. ``jobs/features.py`` takes such a folder through
``model.overrides`` and a rerun from a copy of it finds every feature already stored."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from helpers import image, tone
from mmm.config import AudioConfig, VisionConfig, preset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def save_whisper(path: Path, d_model: int = 32) -> str:
    """A full (encoder-decoder) Whisper checkpoint, as the hub has them, with 5 s windows."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    cfg = WhisperConfig(d_model=d_model, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64,
                        max_source_positions=250, max_target_positions=32, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, decoder_start_token_id=1)
    WhisperForConditionalGeneration(cfg).save_pretrained(path)
    WhisperFeatureExtractor(chunk_length=5).save_pretrained(path)
    return str(path)


def save_siglip(path: Path, hidden: int = 32) -> str:
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    SiglipVisionModel(SiglipVisionConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(path)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ckpts")
    out = {"whisper": save_whisper(root / "whisper"), "siglip": save_siglip(root / "siglip"),
           "whisper_wide": save_whisper(root / "whisper-wide", d_model=64), "siglip_wide": save_siglip(root / "siglip-wide", 64)}
    for name in ("whisper", "siglip"):  # the same checkpoint under another name (a hub name vs a local copy)
        out[name + "_copy"] = str(shutil.copytree(out[name], root / "elsewhere" / name))
    return out


def test_same_checkpoint_in_two_folders_has_one_name(checkpoints):
    from mmm.encoders import AudioEncoder, VisionEncoder

    audio = [AudioEncoder(AudioConfig(pretrained=checkpoints[k])).name for k in ("whisper", "whisper_copy", "whisper_wide")]
    vision = [VisionEncoder(VisionConfig(pretrained=checkpoints[k])).name for k in ("siglip", "siglip_copy", "siglip_wide")]
    for names in (audio, vision):
        assert names[0] == names[1] and names[0] != names[2], names
        assert all("ckpts" not in n and "elsewhere" not in n for n in names), names  # no path in the name
    assert audio[0].startswith("whisper:cfg-") and audio[0].endswith(":layer-1:5s")
    other_layer = AudioEncoder(AudioConfig(pretrained=checkpoints["whisper"], select_layer=-2)).name
    assert other_layer != audio[0]
    # the random tiny encoders keep their digest of the MMM config
    tiny = preset("tiny")
    name = AudioEncoder(tiny.audio, tiny.seed).name
    assert name.startswith("whisper:tiny-random-")
    # how much runs at once and what is accepted do not change the features: the same name
    for setting in ({"window_batch": 16}, {"max_seconds": 60.0}):
        assert AudioEncoder(dataclasses.replace(tiny.audio, **setting), tiny.seed).name == name, setting
    assert AudioEncoder(dataclasses.replace(tiny.audio, init_std=0.2), tiny.seed).name != name


def test_a_shorter_window_runs_the_checkpoint_on_its_first_positions(checkpoints, tmp_path):
    """``audio.window_seconds`` below the checkpoint's window: the same weights, fewer positions,
    its own feature-store name, and a saved model reloads with the window it was trained on."""
    import torch
    from mmm.encoders import AudioEncoder
    from mmm.model import MMMModel

    full = AudioEncoder(AudioConfig(pretrained=checkpoints["whisper"]))
    short = AudioEncoder(AudioConfig(pretrained=checkpoints["whisper"], window_seconds=2))
    assert (full.positions, full.extractor.nb_max_frames) == (250, 500), "None keeps the checkpoint's 5 s"
    assert (short.positions, short.extractor.nb_max_frames, short.window_samples) == (100, 200, 32_000)
    assert torch.equal(short.encoder.embed_positions.weight, full.encoder.embed_positions.weight[:100])
    assert torch.equal(short.encoder.layers[0].fc1.weight, full.encoder.layers[0].fc1.weight)
    assert short.name.endswith(":2s") and short.name != full.name, "the two windows never share stored features"
    wave = tone(3.5)  # two windows of 2 s (the second 1.5 s), 175 frames in all, as in one 5 s window
    assert short.encode([wave])[0].shape == full.encode([wave])[0].shape == (175, 32)
    for bad in (6, 2.5, 0):
        with pytest.raises(ValueError, match=rf"window_seconds={bad:g} does not fit .* 5 s \(250 positions\)"):
            AudioEncoder(AudioConfig(pretrained=checkpoints["whisper"], window_seconds=bad))

    cfg = preset("tiny")
    cfg.audio = AudioConfig(pretrained=checkpoints["whisper"], window_seconds=2)
    MMMModel.build(cfg).save_pretrained(str(tmp_path / "mmm"), phase="stage1")
    loaded = MMMModel.from_pretrained(str(tmp_path / "mmm"))
    assert (loaded.audio.name, loaded.audio.positions) == (short.name, 100)


def test_saved_and_reloaded_checkpoint_keeps_the_names(checkpoints, tmp_path):
    from mmm.model import MMMModel

    cfg = preset("tiny")
    cfg.vision.pretrained, cfg.audio.pretrained = checkpoints["siglip"], checkpoints["whisper"]
    model = MMMModel.build(cfg)
    model.save_pretrained(str(tmp_path / "mmm"), phase="stage1")
    loaded = MMMModel.from_pretrained(str(tmp_path / "mmm"))
    assert (loaded.vision.name, loaded.audio.name) == (model.vision.name, model.audio.name)


def test_features_job_takes_local_checkpoints_through_overrides(checkpoints, tmp_path):
    """Run with the checkpoint in one folder, then with its copy: the rerun encodes nothing."""
    from jobs import features as features_job
    from mmm.encoders import AudioEncoder, VisionEncoder
    from pipelines.features import FeatureModel, FeaturesConfig
    from pipelines.runtime import start_local_ray
    from pipelines.store import FeatureStore
    from pipelines.storage import StorageConfig
    import ray

    media = tmp_path / "media"
    media.mkdir()
    rows = []
    for i in range(3):
        image((40 * i, 200, 0)).save(media / f"p{i}.png")
        sf.write(media / f"t{i}.wav", tone(1.0 + i, 300.0 * (i + 1)).astype(np.float32), 16_000)
        rows += [{"uri": f"media/p{i}.png"}, {"uri": f"media/t{i}.wav"}]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    common = [f"source={manifest}", f"out={out}", "encode.concurrency=1", "ray.progress=false"]

    def models(suffix: str) -> list[str]:
        return [f"model.overrides.audio.pretrained={checkpoints['whisper' + suffix]}",
                f"model.overrides.vision.pretrained={checkpoints['siglip' + suffix]}"]

    with pytest.raises(SystemExit):  # a misspelt model field is refused when the job starts
        features_job.main([*common, "model.overrides.audio.pretrianed=/x"])
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # AF_UNIX paths must stay short
    start_local_ray(num_cpus=4, include_dashboard=False, _temp_dir=ray_tmp, log_to_driver=False)
    try:
        first = features_job.main([*common, *models("")])
        again = features_job.main([*common, *models("_copy")])
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert first["encoded"] == {"image": 3, "audio": 3} and first["errors"] == 0
    assert again["encoded"] == {"image": 0, "audio": 0} and again["skipped"] == 6
    names = set(FeatureStore(str(out / "features"), StorageConfig()).index()["encoder"].to_pylist())
    want = {AudioEncoder(AudioConfig(pretrained=checkpoints["whisper_copy"])).name,
            VisionEncoder(VisionConfig(pretrained=checkpoints["siglip_copy"])).name}
    assert names == want
    cfg = FeaturesConfig(source="x", model=FeatureModel("tiny", {"audio": {"pretrained": "rel/dir"}}))
    assert cfg.model.config().audio.pretrained == "rel/dir"  # not a local path: left as a hub name
