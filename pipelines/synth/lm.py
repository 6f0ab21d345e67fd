"""Language-model backends for the LLM generator: chats in, reply strings out.

``load_backend(name)``: a preset name ("tiny", "tinyllama", "mistral") builds that preset's LM
and tokenizer through :mod:`mmm` (the tiny one is random: nonsense text, real plumbing); any
other name is a Hugging Face model path. vLLM serves it when importable and a GPU is present.
"""

from __future__ import annotations

import importlib.util


def load_backend(name: str, use_vllm: bool = True):
    import torch

    from mmm.config import PRESETS, preset

    # A real preset names its LM checkpoint; vLLM can serve that. The tiny one exists only in mmm.
    path = preset(name).llm.pretrained if name in PRESETS else name
    if use_vllm and path and torch.cuda.is_available() and importlib.util.find_spec("vllm"):
        return VLLMBackend(path)
    return HFBackend(name)


def _format(tokenizer, chat: list[dict]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in chat]
    return "\n".join(lines) + "\nAssistant:"


class HFBackend:
    """transformers ``generate``, left-padded batches, sampled with a fixed seed per call."""

    def __init__(self, name: str):
        import torch

        from mmm.config import PRESETS, preset

        if name in PRESETS:
            from mmm.model import build_llm
            from mmm.tokenizer import load_tokenizer

            cfg = preset(name)
            self.tokenizer = load_tokenizer(cfg.tokenizer, cfg.llm.pretrained)
            self.model = build_llm(cfg, len(self.tokenizer))
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(name)
            self.model = AutoModelForCausalLM.from_pretrained(name, torch_dtype="auto")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        self.tokenizer.truncation_side = "left"  # a long chat loses its oldest turns, never the prompt
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device).eval()

    def generate(self, chats: list[list[dict]], max_new_tokens: int, temperature: float, top_p: float, seed: int) -> list[str]:
        import torch

        texts = [_format(self.tokenizer, chat) for chat in chats]
        limit = getattr(self.model.config, "max_position_embeddings", 2048) - max_new_tokens
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=limit,
                             add_special_tokens=False).to(self.device)
        torch.manual_seed(seed)
        sample = temperature > 0
        with torch.no_grad():
            out = self.model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature if sample else None,
                top_p=top_p if sample else None, pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
            )
        new = out[:, enc["input_ids"].shape[1] :]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


class VLLMBackend:
    """vLLM offline inference (continuous batching) for real models on GPU actors."""

    def __init__(self, name: str):
        from vllm import LLM

        self.llm = LLM(model=name)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, chats: list[list[dict]], max_new_tokens: int, temperature: float, top_p: float, seed: int) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        outs = self.llm.generate([_format(self.tokenizer, c) for c in chats], params, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outs]
