"""Stage 2 with LoRA on a "pretrained" LM: the rows of MMM's added tokens train, merge, save and serve.

The stand-in for a pretrained checkpoint is a small random Llama saved with a tokenizer that has
never heard of MMM's tokens (no media tags, no ChatML), as TinyLlama's or Mistral's lacks them.
"""

from __future__ import annotations

import pytest
import torch

from mmm.chat import IGNORE_INDEX
from mmm.config import LLMConfig, ModelConfig, ProjectorConfig
from mmm.lora import LoraSettings
from mmm.model import MMMModel
from mmm.packing import collate_packed, model_inputs
from mmm.tokenizer import TURN_END, mmm_token_ids


@pytest.fixture(scope="module")
def pretrained_lm(tmp_path_factory):
    """A folder holding a plain causal LM and its tokenizer, as a hub checkpoint would."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = "what colour is the image red green blue audio how many beeps two three one user assistant".split()
    tok.train_from_iterator([" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512))
    path = tmp_path_factory.mktemp("lm")
    lm.save_pretrained(path)
    fast.save_pretrained(path)
    return str(path), len(fast)


def _model(path: str) -> MMMModel:
    config = ModelConfig(preset="tiny", projector=ProjectorConfig(item_ordinals=0),
                         llm=LLMConfig(pretrained=path, max_context=512, attention="sdpa"))
    return MMMModel.build(config)


def _batch(model: MMMModel) -> dict:
    """Two one-turn audio dialogues whose answers end in ``<|im_end|>``."""
    feats = [torch.randn(40, model.audio.hidden_size) for _ in range(2)]
    samples = []
    for f, answer in zip(feats, ("two", "three")):
        r = model.render([{"role": "user", "content": "<audio></audio>how many beeps"},
                          {"role": "assistant", "content": answer}], [f])
        samples.append({"input_ids": r.input_ids, "labels": r.labels, "image_features": [], "audio_features": [f]})
    return model_inputs(collate_packed(samples, 256, model.tokenizer.pad_token_id))


def _train(model: MMMModel, steps: int = 20) -> None:
    batch = _batch(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    model.eval()


def _rows(model: MMMModel, ids: list[int]) -> torch.Tensor:
    return model.llm.get_input_embeddings().weight[ids].detach().clone()


def test_lora_trains_the_added_tokens_rows_and_nothing_else_of_the_vocabulary(pretrained_lm):
    path, original_vocab = pretrained_lm
    model = _model(path)
    new = mmm_token_ids(model.tokenizer)
    assert min(new) >= original_vocab, "MMM's tags and ChatML markers are new to this LM"
    assert model.tokenizer.convert_tokens_to_ids(TURN_END) in new
    assert TURN_END in model.tokenizer.decode(_batch(model)["labels"][0][_batch(model)["labels"][0] != IGNORE_INDEX])
    old = list(range(10))
    before_new, before_old = _rows(model, new), _rows(model, old)
    model.set_trainable(projectors=True, llm=LoraSettings(r=4, alpha=8))
    _train(model)
    embeddings = model.llm.get_input_embeddings()
    merged = embeddings.get_merged_weights(embeddings.active_adapters) if hasattr(embeddings, "get_merged_weights") else None
    weights = merged if merged is not None else embeddings.weight
    assert not torch.allclose(weights[new], before_new), "the new tokens' rows must train"
    assert torch.equal(weights[old].detach(), before_old), "the pretrained rows stay frozen under LoRA"


def test_without_token_training_the_new_rows_stay_as_initialised(pretrained_lm):
    """What plain LoRA does, and why train_new_tokens is on by default."""
    model = _model(pretrained_lm[0])
    new = mmm_token_ids(model.tokenizer)
    before = _rows(model, new)
    model.set_trainable(projectors=True, llm=LoraSettings(r=4, alpha=8, train_new_tokens=False))
    _train(model, steps=3)
    assert torch.equal(model.llm.get_input_embeddings().weight[new].detach(), before)


def _trained_lora(path: str) -> tuple[MMMModel, dict]:
    model = _model(path)
    model.set_trainable(projectors=True, llm=LoraSettings(r=4, alpha=8))
    _train(model)
    return model, _batch(model)


def _answers(model: MMMModel, batch: dict) -> tuple[list[int], float]:
    """The greedy answer to the batch's first prompt, and the batch's loss."""
    prompt = batch["input_ids"][0][: int((batch["labels"][0] != IGNORE_INDEX).nonzero()[0]) + 1]
    with torch.no_grad():
        return model.generate(prompt, audio_features=batch["audio_features"][:1], max_new_tokens=6), float(model(**batch).loss)


def _same(got: tuple[list[int], float], expected: tuple[list[int], float]) -> None:
    assert got[0] == expected[0] and got[1] == pytest.approx(expected[1], rel=1e-4)


def test_a_lora_model_saves_merged_and_serves_the_same_answers(pretrained_lm, tmp_path):
    model, batch = _trained_lora(pretrained_lm[0])
    expected = _answers(model, batch)
    model.save_pretrained(str(tmp_path), phase="stage2")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "llm"))  # merged: no peft needed
    assert not any("lora" in k or "trainable_tokens" in k for k in plain.state_dict())
    _same(_answers(MMMModel.from_pretrained(str(tmp_path), expect_phase="stage2").eval(), batch), expected)


def test_merging_in_place_keeps_the_answers_and_holds_no_second_lm(pretrained_lm, tmp_path):
    """The end of training folds the adapters into the LM's own weights: the same answers, the
    base LM's own parameter tensors, and a save that needs no merged copy."""
    model, batch = _trained_lora(pretrained_lm[0])
    expected = _answers(model, batch)
    base = {k: v.data_ptr() for k, v in model.llm.get_base_model().named_parameters() if "lora_" not in k}
    model.merge_lora()
    assert not hasattr(model.llm, "peft_config")
    # peft writes the trained token rows into a new embedding matrix (and a new head, untied); every
    # other weight takes its adapter's update in place
    own = {(k.replace(".base_layer", ""), p) for k, p in base.items()}
    rows = {"model.embed_tokens.weight", "lm_head.weight"}
    merged = {(k, v.data_ptr()) for k, v in model.llm.named_parameters() if k not in rows}
    assert merged and merged <= own, "each adapted weight is the base LM's own tensor"
    _same(_answers(model, batch), expected)
    model.save_pretrained(str(tmp_path), phase="stage2")
    _same(_answers(MMMModel.from_pretrained(str(tmp_path), expect_phase="stage2").eval(), batch), expected)
