"""The training forward: the LM head only where a label exists.

``MMMModel.forward`` asks the causal LM for logits at every position and HF's loss then ignores
all but the assistant tokens. In the offline dialogues those are ~4% of the tokens (an answer of
one or two words + ``<|im_end|>`` per ~40-token turn), and the LM head (vocab x hidden) plus its
softmax are a large share of a small LM's work: measured on the tiny preset (2 layers, 128 wide,
2048 vocab), 1 thread, rows of 512 tokens, forward + backward per micro-batch 0.47 s -> 0.37 s.

:class:`AnswerLoss` wraps an :class:`~mmm.model.MMMModel` for training only: the same ``embed``
(placeholders filled by masked_scatter), the same decoder with the same packed position ids, then
the head on the labelled positions and the same mean cross-entropy as HF's shifted causal-LM
loss (checked equal in tests/test_train.py). Exports unwrap it (``.model``); serving and
evaluation never see it.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from mmm.chat import IGNORE_INDEX


class AnswerLoss(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, image_features=(), audio_features=(), position_ids=None, attention_mask=None):
        """(B, L) ids and labels -> ``.loss``: mean cross-entropy over the labelled next tokens."""
        llm = self.model.llm
        embeds = self.model.embed(input_ids, image_features, audio_features, position_ids)  # (B, L, D)
        positions = self.model.lm_positions(input_ids, position_ids, attention_mask)
        hidden = llm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                                   use_cache=False).last_hidden_state  # (B, L, D)
        target = labels[:, 1:]  # (B, L-1): token t predicts t+1
        keep = target != IGNORE_INDEX
        logits = llm.get_output_embeddings()(hidden[:, :-1][keep])  # (N, V)
        return SimpleNamespace(loss=nn.functional.cross_entropy(logits.float(), target[keep]))


def unwrap(module: nn.Module) -> nn.Module:
    """The MMMModel inside a training wrapper (or the module itself)."""
    return module.model if isinstance(module, AnswerLoss) else module
