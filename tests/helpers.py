"""Small media and conversations for tests, generated in memory."""

import numpy as np
from PIL import Image

from mmm.config import SAMPLE_RATE


def image(colour=(255, 0, 0), size=32) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    img.paste(colour, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return img


def tone(seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def three_turn_conversation():
    """3 images and 2 audio clips over 3 turns, parts and span strings mixed."""
    return [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "<image></image><image></image> What colour is image 1?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Berapa bip?"}, {"type": "audio"}]},
        {"role": "assistant", "content": "tiga"},
        {"role": "user", "content": [{"type": "text", "text": "And image 3?"}, {"type": "image"}]},
        {"role": "assistant", "content": "blue"},
    ]


def ray_listening_addresses() -> set[str]:
    """IP addresses that the local Ray node started by this process (GCS, raylet, dashboard agents,
    workers: all descendants of this process) listens on."""
    import psutil

    procs = psutil.Process().children(recursive=True)
    found = set()
    for p in procs:
        try:
            found |= {c.laddr.ip for c in p.net_connections("tcp") if c.status == "LISTEN"}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass  # a worker that exited between the listing and the query
    return found
