"""mmm.media: round trips for every format, limits, error messages, windows. Media made in-test."""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import zlib

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mmm.config import SAMPLE_RATE
from mmm.media import (
    AUDIO_FORMATS,
    MediaError,
    MediaLimits,
    audio_format_ok,
    decode_audio,
    decode_image,
    media_id,
    sniff_modality,
    split_windows,
)

SUBTYPES = {"wav": "PCM_16", "flac": "PCM_16", "ogg": "VORBIS", "mp3": "MPEG_LAYER_III"}


def image_bytes(fmt: str, size=(48, 32), mode="RGB") -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (size[1], size[0], len(mode)), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels.squeeze(), mode=mode if mode != "L" else None).save(buf, format=fmt)
    return buf.getvalue()


def audio_bytes(fmt: str, seconds: float, rate: int = 22050, channels: int = 2) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 440 * t)
    buf = io.BytesIO()
    sf.write(buf, np.stack([tone] * channels, axis=1), rate, format=fmt.upper(), subtype=SUBTYPES[fmt])
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_image_round_trip(fmt):
    data = image_bytes(fmt)
    img = decode_image(data, name="image 1")
    assert img.mode == "RGB" and img.size == (48, 32)
    assert sniff_modality(data) == "image"


def test_image_modes_become_rgb():
    assert decode_image(image_bytes("PNG", mode="RGBA")).mode == "RGB"
    assert decode_image(image_bytes("PNG", mode="L")).mode == "RGB"


def _saved(img: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def test_images_decode_as_a_viewer_shows_them():
    """Transparency over white (as transformers' convert_to_rgb), 16-bit grey scaled rather than
    clipped to white, a phone photo's EXIF rotation applied."""
    pixel = lambda img: tuple(np.asarray(decode_image(_saved(img)))[0, 0])  # noqa: E731
    assert pixel(Image.new("RGBA", (4, 4), (0, 0, 0, 0))) == (255, 255, 255)
    assert pixel(Image.new("RGBA", (4, 4), (200, 10, 10, 255))) == (200, 10, 10)
    assert pixel(Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))) == (127, 127, 127)
    exif = Image.new("RGB", (40, 20)).getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    assert decode_image(_saved(Image.new("RGB", (40, 20), (9, 9, 9)), "JPEG", exif=exif)).size == (20, 40)


@pytest.mark.parametrize("fmt", AUDIO_FORMATS)
def test_audio_round_trip_to_16k_mono(fmt):
    data = audio_bytes(fmt, seconds=3.0)
    wave = decode_audio(data, name="audio 1")
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - 3 * SAMPLE_RATE) <= 0.01 * 3 * SAMPLE_RATE
    assert 0.1 < np.abs(wave).max() < 0.5  # the tone survived, stereo averaged not summed
    assert sniff_modality(data) == "audio"
    assert audio_format_ok(fmt) and audio_format_ok(fmt.upper())


def test_audio_at_16k_is_not_resampled():
    wave = decode_audio(audio_bytes("wav", 1.0, rate=SAMPLE_RATE, channels=1))
    assert len(wave) == SAMPLE_RATE


def test_media_id_is_sha256():
    assert media_id(b"abc") == hashlib.sha256(b"abc").hexdigest()
    assert len(media_id(b"")) == 64


def test_corrupt_image_names_item():
    with pytest.raises(MediaError, match=r"^image 2: not a decodable image") as e:
        decode_image(b"this is not an image at all", name="image 2")
    assert e.value.item == "image 2" and "PNG" in e.value.reason


def test_truncated_image_names_item():
    data = image_bytes("PNG", size=(64, 64))
    with pytest.raises(MediaError, match=r"^s3://b/x.png: corrupt or truncated image"):
        decode_image(data[: len(data) // 2], name="s3://b/x.png")


def test_oversized_image_by_pixels():
    data = image_bytes("PNG", size=(100, 100))
    with pytest.raises(MediaError, match=r"^image 3: 100x100 = 0.0 megapixels is more than .* limit") as e:
        decode_image(data, MediaLimits(max_image_pixels=5000), name="image 3")
    assert "decompression" in str(e.value)


def png_header_only(width: int, height: int) -> bytes:
    """A 57-byte PNG that declares width x height and holds no pixels: a decompression bomb's header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_image_bomb_header_is_refused_before_decoding():
    # 9000 x 9000 RGB would take 243 MB to decode; the header alone must be enough to refuse it.
    with pytest.raises(MediaError, match=r"^bomb: 9000x9000 = 81.0 megapixels is more than the 40.0"):
        decode_image(png_header_only(9000, 9000), name="bomb")
    # Past twice Pillow's own limit, Image.open itself raises DecompressionBombError.
    with pytest.raises(MediaError, match=r"^bomb: too many pixels .*decompression-bomb guard"):
        decode_image(png_header_only(30000, 30000), MediaLimits(max_image_pixels=10**10), name="bomb")


def test_oversized_and_empty_bytes():
    with pytest.raises(MediaError, match=r"^image: .* MiB is larger than the 0.0 MiB limit"):
        decode_image(image_bytes("PNG"), MediaLimits(max_image_bytes=100))
    with pytest.raises(MediaError, match=r"^audio 4: empty audio data"):
        decode_audio(b"", name="audio 4")


def test_non_audio_bytes_name_item():
    with pytest.raises(MediaError, match=r"^audio 1: not decodable audio") as e:
        decode_audio(image_bytes("PNG"), name="audio 1")
    assert e.value.item == "audio 1"
    assert sniff_modality(b"plain text, no magic") is None


@pytest.mark.parametrize("fmt", ["flac", "ogg"])
def test_truncated_audio_is_refused(fmt):
    data = audio_bytes(fmt, seconds=3.0)
    with pytest.raises(MediaError, match=r"^audio 2: (not decodable audio|.* shorter than)"):
        decode_audio(data[: len(data) // 2], name="audio 2")


def test_over_long_audio():
    data = audio_bytes("wav", seconds=75.0, rate=8000, channels=1)
    with pytest.raises(MediaError, match=r"^audio 1: 75.0 s is longer than the 60.0 s limit"):
        decode_audio(data, MediaLimits(max_audio_seconds=60.0), name="audio 1")


def test_too_short_audio():
    with pytest.raises(MediaError, match=r"^clip: 0.010 s is shorter than"):
        decode_audio(audio_bytes("wav", seconds=0.01), name="clip")


def test_media_error_survives_pickle():  # Ray ships exceptions between processes
    err = pickle.loads(pickle.dumps(MediaError("image 2", "bad")))
    assert (err.item, err.reason, str(err)) == ("image 2", "bad", "image 2: bad")


@pytest.mark.parametrize("seconds, lengths", [(3, [3]), (30, [30]), (75, [30, 30, 15])])
def test_split_windows(seconds, lengths):
    wave = np.zeros(seconds * SAMPLE_RATE, dtype=np.float32)
    windows = split_windows(wave)
    assert [len(w) for w in windows] == [s * SAMPLE_RATE for s in lengths]
    assert np.concatenate(windows).shape == wave.shape
