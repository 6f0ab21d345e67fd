"""SmolLM2-135M-Instruct from GGUF (Q4_1) -> a plain Hugging Face ``LlamaForCausalLM`` folder.

transformers reads GGUF itself (it needs the ``gguf`` package) and de-quantises every tensor to
float32, undoing llama.cpp's q/k row permutation. A model loaded that way carries a GGUF
``quantization_config`` and refuses ``save_pretrained``, so the weights move into a Llama built
from the same config without it. The weights are saved in float32: the de-quantised values
exactly, and a checkpoint that loads the same on every device. The tokenizer keeps SmolLM2's
own ChatML template and special tokens.
"""

from __future__ import annotations

from pathlib import Path


class GGUFConversionError(ValueError):
    """The GGUF model did not map one to one onto a plain Llama."""


def convert(gguf_path: Path, out: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    try:
        import gguf  # noqa: F401  (transformers needs it to read the file; say so plainly)
    except ImportError:
        raise GGUFConversionError("reading GGUF needs the 'gguf' package: pip install gguf") from None
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantised.config
    del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    plain = LlamaForCausalLM(config)
    result = plain.load_state_dict(quantised.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise GGUFConversionError(f"missing keys {result.missing_keys[:8]}, unexpected keys {result.unexpected_keys[:8]}")
    plain.generation_config = quantised.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"params": sum(p.numel() for p in plain.parameters()), "dtype": "float32"}
