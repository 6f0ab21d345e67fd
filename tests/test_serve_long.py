"""Long inputs on the tiny preset: audio up to 10 minutes (tokens in proportion to duration,
encoder windows in bounded chunks, longer clips refused naming the limit), and a model whose
claimed context exceeds its LM's positions refused at load time."""

import io

import numpy as np
import pytest
import soundfile as sf

from serve.engine import MMMEngine, Prompt
from serve.openai_schema import SamplingParams
from tests.helpers import tone


def flac(seconds: float) -> bytes:
    wave = np.zeros(int(seconds * 16000), np.float32)
    wave[: 16000 * 2] = tone(2.0)  # a tone, then silence: small as FLAC, long in time
    buf = io.BytesIO()
    sf.write(buf, wave, 16000, format="FLAC")
    return buf.getvalue()


def test_long_audio_tokens_follow_duration_and_windows_go_in_chunks(tiny_model, monkeypatch):
    engine = MMMEngine(tiny_model)
    audio = tiny_model.audio
    seen = []
    forward = type(audio).forward
    monkeypatch.setattr(type(audio), "forward", lambda self, mels: seen.append(mels.shape[0]) or forward(self, mels))
    pad = tiny_model.pad_ids["audio"]
    for seconds in (31.0, 600.0):
        wave = engine.decode_media("audio", flac(seconds), "clip")
        feats = engine.encode("audio", [wave])
        ids = engine.render([{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "?"}]}], feats)
        assert ids.count(pad) == int(np.ceil(seconds * 12.5))  # 12.5 tokens a second: 388, 7500
    windows = int(600 / tiny_model.config.audio.window_seconds)
    assert max(seen) <= tiny_model.config.audio.window_batch and sum(seen) == 7 + windows
    decoder = engine.start([Prompt(ids, [], feats, ["a" * 64])], [SamplingParams(temperature=0)])
    assert len(decoder.step()) == 1  # the 10-minute prompt (7.5k tokens) prefills and decodes
    with pytest.raises(ValueError, match=r"600\.0 s limit"):
        engine.decode_media("audio", flac(601.0), "messages[0].content[0].input_audio")


def test_a_context_beyond_the_lms_positions_is_refused_at_load(tiny_model):
    llm = tiny_model.config.llm
    saved = llm.max_context
    llm.max_context = tiny_model.llm.config.max_position_embeddings + 1
    try:
        with pytest.raises(ValueError, match="positions; set llm.max_context <= 8192"):
            MMMEngine(tiny_model)
    finally:
        llm.max_context = saved
