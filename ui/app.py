"""A web chat in front of the MMM server: drop pictures and audio clips into a conversation.

Usage:
    make serve                                   # the OpenAI API on http://127.0.0.1:8000
    make ui                                      # this app on http://127.0.0.1:7860
    python ui/app.py --api-base http://HOST:8000/v1 --api-key KEY --port 7860

Each message may carry several pictures and audio clips and English or Malay text; the answer
streams in token by token. Every turn sends the whole conversation to
``POST /v1/chat/completions`` (ui/messages.py says how media are inlined). ``MMM_API_BASE`` and
``MMM_API_KEY`` set the defaults of ``--api-base`` and ``--api-key``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ui.messages import EmptyMessage, UnsupportedFile, to_openai  # noqa: E402

TITLE = "MMM chat"
DESCRIPTION = ("Pictures and audio clips in any turn, questions in English or Malay. Media are numbered "
               "across the whole chat: ask about “image 2” or “audio 1”.")
MODEL = "mmm"
NO_ANSWER = "(no answer)"
EXAMPLES = ["What colour are the shapes in image 1?", "How many beeps are in audio 1?",
            "Berapa banyak bentuk dalam gambar 1?"]


@dataclass
class UIConfig:
    api_base: str = "http://127.0.0.1:8000/v1"
    """The OpenAI-compatible endpoint of ``serve run serve.app:mmm``."""
    api_key: str = "-"
    """Bearer token when the server was started with ``api_key=...``; any string otherwise."""
    host: str = "127.0.0.1"
    """Listen address of the web page; 127.0.0.1 keeps it on this machine."""
    port: int = 7860
    max_tokens: int = 64
    """Longest answer; the tiny preset's answers are a few words."""
    temperature: float = 0.0
    """Greedy by default: the tiny model's answers are facts, not prose."""
    timeout_s: float = 120.0
    max_file_size: str = "20mb"
    """Largest upload; every turn re-sends the whole chat, and the server takes 64 MiB a request."""


def make_reply(cfg: UIConfig):
    """The chat function: (message, history) -> a stream of the growing answer."""
    import gradio as gr
    import openai

    client = openai.OpenAI(base_url=cfg.api_base, api_key=cfg.api_key, timeout=cfg.timeout_s, max_retries=0)

    def reply(message: dict, history: list[dict]) -> Iterator[str]:
        try:
            messages = to_openai(message, history)
        except (UnsupportedFile, EmptyMessage) as e:
            raise gr.Error(str(e)) from e
        try:
            # "mmm" names whatever checkpoint the server runs, so a restarted server is still found
            stream = client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                    max_tokens=cfg.max_tokens, temperature=cfg.temperature)
            answer = ""
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    answer += chunk.choices[0].delta.content
                    yield answer
            if not answer:
                yield NO_ANSWER  # the turn stays in the history with its media, so their numbers hold
        except openai.APITimeoutError as e:
            raise gr.Error(f"the server at {cfg.api_base} did not answer within {cfg.timeout_s:.0f} s") from e
        except openai.APIConnectionError as e:
            raise gr.Error(f"no MMM server at {cfg.api_base} ({e}); start one with `make serve`") from e
        except openai.APIStatusError as e:
            hint = "; the chat is larger than the server takes: start a new chat" if e.status_code == 413 else ""
            raise gr.Error(f"the server refused the request: {e.status_code} {e.message}{hint}") from e
        except openai.APIError as e:  # an error event inside the stream
            raise gr.Error(f"the server failed while answering: {e.message}") from e

    return reply


def build(cfg: UIConfig):
    """The Gradio app (not launched)."""
    import gradio as gr

    textbox = gr.MultimodalTextbox(file_types=["image", "audio"], file_count="multiple",
                                   placeholder="Type in English or Malay; drop pictures and audio clips here",
                                   sources=["upload", "microphone"])
    return gr.ChatInterface(make_reply(cfg), multimodal=True, textbox=textbox, title=TITLE,
                            description=DESCRIPTION, examples=[{"text": t} for t in EXAMPLES],
                            run_examples_on_click=False, analytics_enabled=False, api_name="chat")


def parse(argv: list[str] | None) -> UIConfig:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = UIConfig()
    ap.add_argument("--api-base", default=os.environ.get("MMM_API_BASE", d.api_base))
    ap.add_argument("--api-key", default=os.environ.get("MMM_API_KEY", d.api_key))
    ap.add_argument("--host", default=d.host)
    ap.add_argument("--port", type=int, default=d.port)
    ap.add_argument("--max-tokens", type=int, default=d.max_tokens)
    ap.add_argument("--temperature", type=float, default=d.temperature)
    a = ap.parse_args(argv)
    return UIConfig(api_base=a.api_base, api_key=a.api_key, host=a.host, port=a.port,
                    max_tokens=a.max_tokens, temperature=a.temperature)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    cfg = parse(argv)
    print(f"MMM chat on http://{cfg.host}:{cfg.port} -> {cfg.api_base}", flush=True)
    build(cfg).queue().launch(server_name=cfg.host, server_port=cfg.port, share=False, show_error=True,
                              max_file_size=cfg.max_file_size)


if __name__ == "__main__":
    main()
