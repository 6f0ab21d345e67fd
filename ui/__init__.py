"""A web chat (Gradio) in front of the OpenAI-compatible API of ``serve run serve.app:mmm``."""
