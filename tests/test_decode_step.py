"""The lean decode step (mmm/decode_step.py) decodes exactly what the LM's own forward decodes."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from helpers import image, tone
from mmm.decode_step import decode_step_for
from mmm.generation import Sampling, StepDecoder, lm_call


def _prompts(model):
    """Rows of different lengths (so the batch is left-padded), with an image and a clip."""
    feats = model.encode_media("image", [image()]) + model.encode_media("audio", [tone(1.0)])
    chats = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]}],
             [{"role": "user", "content": [{"type": "text", "text": "berapa bip dalam klip ini?"}, {"type": "audio"}]}],
             [{"role": "user", "content": "hi"}],
             [{"role": "user", "content": "which shape is in the picture, and what colour is it?"}]]
    media = [(feats[:1], []), ([], feats[1:]), ([], []), ([], [])]
    return [(model.render(c, [*i, *a], True).input_ids, i, a) for c, (i, a) in zip(chats, media)]


def _decode(model, prompts, lean: bool):
    """12 greedy steps of three rows; the fourth row joins at step 4; rows 0 and 3 stay from step 8."""
    greedy = Sampling(temperature=0.0)
    dec = StepDecoder(model, prompts[:3], [greedy] * 3, lean_step=lean)
    assert (dec.lean is not None) == lean
    tokens = []
    for step in range(12):
        if step == 4:
            dec.merge(StepDecoder(model, prompts[3:], [greedy], lean_step=lean))
        if step == 8:
            dec.keep([0, 3])
        tokens.append(dec.step())
    dec._feed()
    return tokens, dec.logits


def test_lean_steps_decode_what_the_lms_forward_decodes(tiny_model):
    prompts = _prompts(tiny_model)
    lean_tokens, lean_logits = _decode(tiny_model, prompts, lean=True)
    hf_tokens, hf_logits = _decode(tiny_model, prompts, lean=False)
    assert lean_tokens == hf_tokens
    assert torch.allclose(lean_logits, hf_logits, atol=1e-5), (lean_logits - hf_logits).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_query_attention_and_half_precision_match_the_forward(dtype):
    """SmolLM2's shape of attention (more query heads than key/value heads), in float32 and bf16."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.2)  # large enough weights that attention depends on content
    llm = LlamaForCausalLM(cfg).to(dtype).eval()
    step = decode_step_for(llm)
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 is left-padded
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        _, ours = lm_call(llm, DynamicCache(), input_ids=ids, attention_mask=mask, position_ids=positions)
        _, theirs = lm_call(llm, DynamicCache(), input_ids=ids, attention_mask=mask, position_ids=positions)
        token, mask = torch.tensor([5, 11]), torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        nxt = positions[:, -1:] + 1
        lean = step(token, nxt, mask, ours)
        out, _ = lm_call(llm, theirs, input_ids=token[:, None], attention_mask=mask, position_ids=nxt)
    ref = out.logits[:, -1].float()
    error = (lean.float() - ref).abs().max() / ref.abs().max()
    assert lean.dtype == dtype and error < (1e-5 if dtype == torch.float32 else 1e-3), error


def test_other_lms_keep_their_own_forward():
    small = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    assert decode_step_for(LlamaForCausalLM(LlamaConfig(**small))) is not None
    assert decode_step_for(LlamaForCausalLM(LlamaConfig(**small, attention_bias=True))) is None
    assert decode_step_for(LlamaForCausalLM(LlamaConfig(**small, hidden_act="gelu"))) is None
    assert decode_step_for(MistralForCausalLM(MistralConfig(**small))) is None


def test_a_llama_with_adapters_keeps_its_own_forward():
    """LoRA and trainable token rows, wrapped (the PeftModel) or seen through the model they were
    injected into (still a ``LlamaForCausalLM``): the step would read the base weights only."""
    from peft import LoraConfig, get_peft_model

    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    for adapter in (LoraConfig(r=4, target_modules=["q_proj"]), LoraConfig(r=4, target_modules=["lm_head"]),
                    LoraConfig(r=4, target_modules=["down_proj"], trainable_token_indices=[3])):
        wrapped = get_peft_model(LlamaForCausalLM(cfg), adapter)
        assert decode_step_for(wrapped) is None and decode_step_for(wrapped.get_base_model()) is None


def test_a_prefix_as_long_as_the_prompt_is_reused_up_to_its_last_token(tiny_model):
    """A resent prompt whose whole KV is cached: the decoder reuses all but its last token (whose
    logits the next token needs), alone or beside a longer row, and gets a full prefill's logits."""
    from mmm.generation import Past

    short, longer = _prompts(tiny_model)[0], _prompts(tiny_model)[3]
    greedy = Sampling(temperature=0.0)
    first = StepDecoder(tiny_model, [short], [greedy])
    n = first.fed(0)
    whole = Past(first.row_kv(0, n), n)
    assert n == len(short[0])
    alone = StepDecoder(tiny_model, [short], [greedy], past=[whole])
    beside = StepDecoder(tiny_model, [short, longer], [greedy] * 2, past=[whole, None])
    full = StepDecoder(tiny_model, [short, longer], [greedy] * 2)
    torch.testing.assert_close(alone.logits[0], first.logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(beside.logits, full.logits, atol=1e-5, rtol=0)
