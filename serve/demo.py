"""Serve a checkpoint with ``serve run`` and hold a conversation with it through the OpenAI API
(the end of ``make demo``). The server is a subprocess on 127.0.0.1, stopped by its PID.

    from serve.demo import audio_part, image_part, serve_and_chat
    turns = [[image_part(img1), image_part(img2), "What colour is the shape in image 1?"],
             [audio_part(clip1), audio_part(clip2), "Berapa bip dalam audio 2?"]]
    answers = serve_and_chat("outputs/demo/stage2/final", turns)   # prints each turn as it goes
"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def image_part(img) -> dict:
    """A PIL image as an OpenAI ``image_url`` part (PNG data URL)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}}


def audio_part(wave: np.ndarray, sample_rate: int = 16000, fmt: str = "wav") -> dict:
    """A mono float wave as an OpenAI ``input_audio`` part."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.asarray(wave, np.float32), sample_rate, format=fmt.upper())
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(buf.getvalue()).decode(), "format": fmt}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    import requests

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`serve run` exited with code {proc.returncode} before the app was up")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError(f"the app at {url} was not healthy after {timeout_s:.0f} s")


def start_server(checkpoint: str | None, port: int, log_path: str) -> subprocess.Popen:
    """``serve run serve.app:build`` in a subprocess with its own Ray (a private temp dir)."""
    serve_cli = Path(sys.executable).with_name("serve")
    cmd = [str(serve_cli), "run", "serve.app:build", f"port={port}", "max_replicas=1"]
    if checkpoint:
        cmd.append(f"checkpoint={checkpoint}")
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
                        "RAY_TMPDIR": tempfile.mkdtemp(prefix="mmm-demo-serve-", dir="/tmp"),
                        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # its own Ray binds 127.0.0.1 only
    env.pop("RAY_ADDRESS", None)
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM (``serve run`` ignores SIGINT in the background), then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve_and_chat(checkpoint: str | None, turns: list[list], max_tokens: int = 24, timeout_s: float = 300,
                   log_path: str | None = None) -> list[str]:
    """Start the app, send each user turn (parts or strings) with the whole history, print and return
    the answers, stop the app. Each turn re-sends the earlier media, as OpenAI clients do. The
    server's output goes to ``log_path`` (default: a file in the temp dir)."""
    import openai

    port = _free_port()
    log_path = log_path or os.path.join(tempfile.gettempdir(), f"mmm-serve-{port}.log")
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    proc = start_server(checkpoint, port, log_path)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc, timeout_s)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        print(f"serving {model} at http://127.0.0.1:{port}/v1 (log: {log_path})")
        history, answers = [], []
        for turn in turns:
            parts = [{"type": "text", "text": p} if isinstance(p, str) else p for p in turn]
            history.append({"role": "user", "content": parts})
            reply = client.chat.completions.create(model=model, messages=history, max_tokens=max_tokens, temperature=0)
            answer = reply.choices[0].message.content
            history.append({"role": "assistant", "content": answer})
            answers.append(answer)
            media = [p["type"] for p in parts if p["type"] != "text"]
            text = " ".join(p["text"].strip() for p in parts if p["type"] == "text")
            print(f"user: [{', '.join(media)}] {text}\nmmm:  {answer}   ({reply.usage.prompt_tokens} prompt tokens)\n")
        return answers
    finally:
        stop_server(proc)
