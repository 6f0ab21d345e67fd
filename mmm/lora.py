"""LoRA adapters for stage 2 (peft), with the rows of MMM's added tokens trained too.

A pretrained LM meets tokens it never saw: the media tags and, for LMs without ChatML, the turn
markers. Their embedding rows (and output rows, where the head is not tied) start from the
resize's initialisation; under plain LoRA they stay frozen, so the model could never learn to
emit a new ``<|im_end|>`` and would never stop. peft's ``trainable_token_indices`` trains exactly
those rows and merges them into the weights on save, so a merged checkpoint loads with plain
transformers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    """Rank (peft's common default)."""
    alpha: int = 32
    dropout: float = 0.0
    targets: str | list[str] = "all-linear"
    """peft's shorthand for every linear layer but the output head (QLoRA's recommendation), or module names."""
    train_new_tokens: bool = True
    """Train the embedding (and untied output) rows of the tokens MMM adds to a pretrained vocabulary."""


def add_lora(llm, settings: LoraSettings, token_ids: list[int]):
    """Wrap ``llm`` with LoRA adapters; ``token_ids``' embedding and output rows train too."""
    from peft import LoraConfig, get_peft_model

    if hasattr(llm, "peft_config"):
        return llm
    trainable = None
    if settings.train_new_tokens and token_ids:
        trainable = {_module_name(llm, llm.get_input_embeddings()): list(token_ids)}
        if not _tied(llm):
            trainable[_module_name(llm, llm.get_output_embeddings())] = list(token_ids)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.targets, task_type="CAUSAL_LM", trainable_token_indices=trainable)
    return get_peft_model(llm, config)


def merged(llm, keep_adapters: bool = True):
    """``llm`` with adapters and trained token rows merged in (``llm`` itself if plain). With
    ``keep_adapters`` the merge goes into a copy and ``llm`` stays as it was; without, into ``llm``'s
    own weights, and the plain LM returned replaces it: no second copy of the LM in memory (14 GB
    more at Mistral-7B in bf16)."""
    if not hasattr(llm, "peft_config"):
        return llm
    return (copy.deepcopy(llm) if keep_adapters else llm).merge_and_unload()


def _tied(llm) -> bool:
    out = llm.get_output_embeddings()
    return out is not None and out.weight is llm.get_input_embeddings().weight


def _module_name(llm, module) -> str:
    """The last component of ``module``'s name in ``llm`` (what peft matches: "embed_tokens", "lm_head")."""
    for name, m in llm.named_modules():
        if m is module:
            return name.rsplit(".", 1)[-1]
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(llm).__name__}")
