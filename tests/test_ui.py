"""The web chat for real: ``serve run serve.app:build`` (the untrained tiny preset) and ``ui/app.py``
as subprocesses on 127.0.0.1, one turn with two pictures and an audio clip driven through
``gradio_client``, and a headless Chromium screenshot of the page kept in ``outputs/ui/``."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile as sf
from PIL import Image

from tests.helpers import image, tone
from ui.messages import to_openai

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "outputs" / "ui"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 240) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=3).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not up after {timeout_s} s:\n{log.read_text()[-3000:]}")


def start(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # `serve run` in the background ignores SIGINT
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("media")
    image((255, 0, 0)).save(root / "red.png")
    Image.fromarray(np.asarray(image((0, 0, 255), size=48))).save(root / "blue.jpg")
    sf.write(root / "beeps.wav", tone(1.0, 880.0), 16000)
    return [str(root / "red.png"), str(root / "blue.jpg"), str(root / "beeps.wav")]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(api url, ui url, log folder): the MMM server and the web chat, both on 127.0.0.1."""
    logs = tmp_path_factory.mktemp("logs")
    api_port, ui_port = free_port(), free_port()
    env = os.environ | {"RAY_TMPDIR": tempfile.mkdtemp(prefix="mmm-ui-", dir="/tmp"), "PYTHONPATH": str(REPO),
                        "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("RAY_ADDRESS", None)
    serve_cli = str(Path(sys.executable).with_name("serve"))
    api = start([serve_cli, "run", "serve.app:build", f"port={api_port}", "max_replicas=1",
                 f"search_dir={logs / 'no-checkpoints'}"], logs / "serve.log", env)
    ui = start([sys.executable, "ui/app.py", "--api-base", f"http://127.0.0.1:{api_port}/v1", "--port", str(ui_port)],
               logs / "ui.log", env)
    try:
        wait_until_up(f"http://127.0.0.1:{api_port}/health", api, logs / "serve.log")
        wait_until_up(f"http://127.0.0.1:{ui_port}/", ui, logs / "ui.log")
        yield f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{ui_port}/", logs
    finally:
        stop(ui)
        stop(api)
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


def test_history_is_resent_with_media_inlined(media):
    """Gradio's history (a file per entry, typed parts) becomes OpenAI messages, media first."""
    history = [{"role": "user", "content": [{"type": "file", "file": {"path": media[0]}}]},
               {"role": "user", "content": {"path": media[2]}},
               {"role": "user", "content": "What colour are the shapes in image 1?"},
               {"role": "assistant", "content": [{"type": "text", "text": "image 1 red"}]}]
    messages = to_openai({"text": "Berapa bip dalam audio 1?", "files": [media[1]]}, history)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    first = messages[0]["content"]
    assert [p["type"] for p in first] == ["image_url", "input_audio", "text"]
    assert first[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert first[1]["input_audio"]["format"] == "wav"
    assert messages[1]["content"] == "image 1 red"
    assert messages[2]["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert messages[2]["content"][1] == {"type": "text", "text": "Berapa bip dalam audio 1?"}


def test_unsupported_file_is_a_clear_error(tmp_path):
    from ui.messages import UnsupportedFile

    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(UnsupportedFile, match="notes.txt"):
        to_openai({"text": "hi", "files": [str(bad)]}, [])


def test_a_failed_turn_is_not_resent_and_an_empty_message_is_refused(media, tmp_path):
    from ui.messages import EmptyMessage

    bad = tmp_path / "photo.tiff"
    bad.write_bytes(b"II*\x00")
    history = [{"role": "user", "content": {"path": media[0]}},
               {"role": "user", "content": "What colour are the shapes in image 1?"},
               {"role": "assistant", "content": "image 1 red"},
               {"role": "user", "content": {"path": str(bad)}},  # refused: no answer follows
               {"role": "user", "content": "And this one?"}]
    messages = to_openai({"text": "How many shapes are in image 1?", "files": []}, history)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[2]["content"] == [{"type": "text", "text": "How many shapes are in image 1?"}]
    for empty in ({"text": "  ", "files": []}, ""):
        with pytest.raises(EmptyMessage):
            to_openai(empty, history)


def test_chat_turn_through_the_web_ui_and_a_screenshot(servers, media):
    from gradio_client import Client, handle_file

    api, ui, logs = servers
    client = Client(ui, verbose=False)
    answer = client.predict({"text": "What colour are the shapes in image 1?",
                             "files": [handle_file(m) for m in media]}, api_name="/chat")
    assert isinstance(answer, str), answer
    stats = requests.get(f"{api}/v1/stats", timeout=10).json()
    assert "Traceback" not in (logs / "ui.log").read_text()
    # the three media reached the model (each encoded once: a cache miss)
    assert _misses(stats) >= 3, stats

    page = screenshot(ui, SHOTS / "chat.png")
    assert "MMM chat" in page
    png = Image.open(SHOTS / "chat.png").convert("L")
    low, high = png.getextrema()
    assert png.size[0] >= 800 and high - low > 50, (png.size, low, high)
    assert (SHOTS / "chat.png").stat().st_size > 10_000


def _misses(stats: dict) -> int:
    """Feature-cache misses in /v1/stats, wherever the server nests them."""
    if isinstance(stats, dict):
        return sum(v if k == "misses" and isinstance(v, int) else _misses(v) for k, v in stats.items())
    if isinstance(stats, list):
        return sum(_misses(v) for v in stats)
    return 0


def screenshot(url: str, png: Path) -> str:
    """Headless Chromium: a PNG of the page after its scripts ran, and the rendered DOM's text."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing (.ci/run installs it: apt-get install -y chromium)")
        pytest.skip("no chromium on this machine (apt-get install -y chromium)")
    png.parent.mkdir(parents=True, exist_ok=True)
    profile = tempfile.mkdtemp(prefix="mmm-chromium-")
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--no-first-run", f"--user-data-dir={profile}", "--hide-scrollbars", "--window-size=1280,900",
              "--virtual-time-budget=20000"]
    try:
        subprocess.run([*common, f"--screenshot={png}", url], check=True, capture_output=True, timeout=180)
        dom = subprocess.run([*common, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=180)
        return dom.stdout
    finally:
        shutil.rmtree(profile, ignore_errors=True)
