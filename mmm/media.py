"""Decode untrusted image and audio bytes into what the encoders take, or fail with one error.

Every media failure (wrong format, corrupt, too big, too long, too short) raises
:class:`MediaError`, whose message names the item and the problem, so that ingest can write it
to the errors table and the server can answer 400 with it, without either knowing about PIL
or libsndfile. Limits are checked from headers before any full decode, so a small file that
claims to be huge (a decompression bomb, an hour of low-bitrate mp3) costs nothing.

    img = decode_image(data, MediaLimits(), name="image 2")    # PIL.Image, RGB
    wave = decode_audio(data, MediaLimits(), name="audio 1")   # float32 mono, 16 kHz
    windows = split_windows(wave)                              # 30 s pieces, last one shorter
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr
from PIL import Image, ImageOps

from mmm.config import SAMPLE_RATE, WINDOW_SECONDS

MiB = 1 << 20
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")
"""Values accepted for an OpenAI-style ``input_audio.format``; all four decode through soundfile."""


class MediaError(ValueError):
    """One media item could not be used; ``str(e)`` is ``"<item>: <reason>"``."""

    def __init__(self, item: str, reason: str) -> None:
        super().__init__(f"{item}: {reason}")
        self.item = item
        self.reason = reason

    def __reduce__(self):
        # Ray pickles exceptions across processes; the default reduce would call
        # MediaError(message) and lose `reason` (or fail with a TypeError).
        return (MediaError, (self.item, self.reason))


@dataclass(frozen=True)
class MediaLimits:
    """Bounds on one media item: a request or a dataset row cannot ask for unbounded work.

    Frozen because a default instance is shared as the functions' default argument; derive
    variants with ``dataclasses.replace``."""

    max_image_bytes: int = 20 * MiB
    """Larger than any sane photo upload (OpenAI caps images at 20 MB); rejects before decoding."""
    max_image_pixels: int = 40_000_000
    """Checked from the header before decoding: a few-KiB PNG can declare 50000x50000 and expand to
    gigabytes (a decompression bomb). 40 MP covers any camera photo; encoders resize to <= 384 px."""
    max_audio_bytes: int = 50 * MiB
    """About 4.5 min of 16-bit 48 kHz stereo WAV; anything larger cannot fit the seconds limit."""
    max_audio_seconds: float = 600.0
    """Twenty 30 s Whisper windows (10 minutes); matches ``AudioConfig.max_seconds``, bounds encoder compute."""
    min_audio_seconds: float = 0.05
    """Below 50 ms there is no speech and Whisper yields < 3 frames: an empty or broken clip."""


def media_id(data: bytes) -> str:
    """Content address of a media item: the sha256 hex of its bytes (dedups repeated uploads)."""
    return hashlib.sha256(data).hexdigest()


def audio_format_ok(fmt: str) -> bool:
    """Whether ``fmt`` (e.g. ``input_audio.format``) names a format we decode."""
    return fmt.lower() in AUDIO_FORMATS


def _check_bytes(data: bytes, limit: int, name: str, what: str) -> None:
    if not data:
        raise MediaError(name, f"empty {what} data (0 bytes)")
    if len(data) > limit:
        raise MediaError(name, f"{len(data) / MiB:.1f} MiB is larger than the {limit / MiB:.1f} MiB limit")


def decode_image(data: bytes, limits: MediaLimits = MediaLimits(), name: str = "image") -> Image.Image:
    """Decode PNG/JPEG/WebP/GIF/BMP bytes into an RGB image (first frame of an animation)."""
    _check_bytes(data, limits.max_image_bytes, name, "image")
    try:
        img = Image.open(io.BytesIO(data))  # lazy: reads the header only
    except Image.DecompressionBombError as e:
        raise MediaError(name, f"too many pixels to decode safely (decompression-bomb guard): {e}") from e
    except Exception as e:  # UnidentifiedImageError, SyntaxError, struct.error...: all "not an image"
        raise MediaError(name, "not a decodable image (PNG/JPEG/WebP/GIF/BMP)") from e
    width, height = img.size
    if width * height > limits.max_image_pixels:
        raise MediaError(
            name,
            f"{width}x{height} = {width * height / 1e6:.1f} megapixels is more than the "
            f"{limits.max_image_pixels / 1e6:.1f} megapixel limit (decompression-bomb guard)",
        )
    try:
        img.load()  # the full decode; truncated or corrupt data fails here, not later in an encoder
        return to_rgb(ImageOps.exif_transpose(img))  # a phone photo upright, as it is shown
    except Image.DecompressionBombError as e:
        raise MediaError(name, f"too many pixels to decode safely (decompression-bomb guard): {e}") from e
    except Exception as e:  # PIL raises OSError, ValueError, zlib.error... for broken pixel data
        raise MediaError(name, f"corrupt or truncated image data ({type(e).__name__}: {e})") from e


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB as a viewer shows the image: transparency over white (as transformers' convert_to_rgb),
    16-bit and float greys scaled to 8 bits (Pillow's convert would clip them to white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
    elif img.mode == "F":
        img = Image.fromarray(np.asarray(img).clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    return img.convert("RGB")


def _read_audio(data: bytes, limits: MediaLimits, name: str) -> tuple[np.ndarray, int]:
    """(frames, channels) float32 at the file's own rate, after checking duration from the header."""
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, frames = f.samplerate, f.frames
            if rate <= 0:
                raise MediaError(name, f"invalid sample rate {rate} in the header")
            if frames / rate > limits.max_audio_seconds:
                raise MediaError(name, _too_long(frames / rate, limits))
            # Read at most one frame past the limit, so a header that under-reports cannot make
            # us decode hours of audio; the length is checked again on what was actually read.
            cap = int(limits.max_audio_seconds * rate) + 1
            samples = f.read(frames=cap, dtype="float32", always_2d=True)
            # A cut-off WAV or MP3 decodes to the prefix that is there (libsndfile shrinks the
            # count); not refused, as MP3 frame counts are estimates for VBR without a Xing tag.
    except MediaError:
        raise
    except Exception as e:  # libsndfile: "Format not recognised", lost sync, ...
        detail = getattr(e, "error_string", None) or str(e)  # without "<_io.BytesIO object at 0x..>"
        raise MediaError(name, f"not decodable audio ({'/'.join(AUDIO_FORMATS).upper()}): {detail}") from e
    return samples, rate


def _too_long(seconds: float, limits: MediaLimits) -> str:
    return f"{seconds:.1f} s is longer than the {limits.max_audio_seconds:.1f} s limit"


def decode_audio(data: bytes, limits: MediaLimits = MediaLimits(), name: str = "audio") -> np.ndarray:
    """Decode WAV/FLAC/OGG/MP3 bytes into float32 mono at ``SAMPLE_RATE`` (16 kHz), shape (T,)."""
    _check_bytes(data, limits.max_audio_bytes, name, "audio")
    samples, rate = _read_audio(data, limits, name)  # (T, C)
    seconds = len(samples) / rate
    if seconds > limits.max_audio_seconds:
        raise MediaError(name, _too_long(seconds, limits))
    if seconds < limits.min_audio_seconds:
        raise MediaError(name, f"{seconds:.3f} s is shorter than the {limits.min_audio_seconds} s minimum")
    if not np.isfinite(samples).all():  # float WAV can carry NaN/inf, which would poison features
        raise MediaError(name, "audio contains NaN or infinite samples")
    wave = samples.mean(axis=1, dtype=np.float32)  # (T,) mono: Whisper takes one channel
    if rate != SAMPLE_RATE:
        # soxr directly: same resampler librosa's "soxr_hq" uses, without numba's ~40 s first call.
        wave = soxr.resample(wave, rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(wave, dtype=np.float32)


def split_windows(
    wave: np.ndarray, sample_rate: int = SAMPLE_RATE, window_seconds: float = WINDOW_SECONDS
) -> list[np.ndarray]:
    """Consecutive ``window_seconds`` pieces of ``wave`` (views); the last is the unpadded remainder.

    The encoder pads each window itself and keeps only the frames holding real audio, so padding
    here would only add silence it has to cut again. A 75 s clip gives 30 + 30 + 15 s.
    """
    if wave.ndim != 1:
        raise ValueError(f"split_windows takes a mono (T,) wave, got shape {wave.shape}")
    size = int(round(window_seconds * sample_rate))
    if size <= 0:
        raise ValueError(f"window of {window_seconds} s at {sample_rate} Hz has no samples")
    return [wave[i : i + size] for i in range(0, len(wave), size)]


def sniff_modality(data: bytes) -> str | None:
    """"image", "audio" or None from the leading magic bytes (for ingest of unlabelled files)."""
    head = data[:16]
    if head[:4] == b"RIFF" and head[8:12] in (b"WEBP", b"WAVE"):
        return "image" if head[8:12] == b"WEBP" else "audio"
    if head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")):
        return "image"
    if head.startswith((b"fLaC", b"OggS", b"ID3")):
        return "audio"
    # A bare MPEG audio frame starts with an 11-bit sync word (JPEG's FF D8 was matched above).
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        return "audio"
    return None
