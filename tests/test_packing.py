"""Packed rows: same logits per sample as running it alone; pad waste measured."""

import torch

from helpers import image, tone
from mmm.packing import collate_packed, collate_padded, pad_waste, plan_bins
from mmm.schema import AUDIO, IMAGE


def _samples(m, n=5):
    out = []
    for i in range(n):
        # two images in some samples: item numbers must restart with each packed sample
        imgs = m.encode_media(IMAGE, [image((40 * i, 0, 255 - 40 * i)), image((0, 30 * i, 0))][: 1 + i % 4 // 2]) \
            if i % 2 == 0 else []
        auds = m.encode_media(AUDIO, [tone(0.5 + i * 0.4, 300 + 100 * i)]) if i % 3 != 1 else []
        content = "<image></image>" * len(imgs) + "<audio></audio>" * len(auds) + " what" + " is it" * i
        msgs = [{"role": "user", "content": content}, {"role": "assistant", "content": "red " * (i + 1)}]
        r = m.render(msgs, imgs + auds)
        out.append({"input_ids": r.input_ids, "labels": r.labels, "image_features": imgs, "audio_features": auds})
    return out


def test_packed_rows_match_samples_alone(tiny_model):
    m = tiny_model
    samples = _samples(m)
    batch = collate_packed(samples, context_length=160, pad_id=m.tokenizer.pad_token_id)
    assert len(batch["rows"]) < len(samples)
    with torch.no_grad():
        packed = m(batch["input_ids"], batch["image_features"], batch["audio_features"],
                   position_ids=batch["position_ids"]).logits
        for r, row in enumerate(batch["rows"]):
            at = 0
            for i in row:
                s = samples[i]
                n = len(s["input_ids"])
                alone = m(torch.tensor([s["input_ids"]]), s["image_features"], s["audio_features"]).logits[0]
                torch.testing.assert_close(packed[r, at : at + n], alone, atol=1e-4, rtol=0)
                at += n


def test_item_numbers_and_shared_positions_follow_packed_samples():
    from mmm.spans import item_numbers, shared_span_positions

    # two samples packed in one row, then trailing pad; 5 = <image>, 9 = its placeholder, 6 = </image>
    ids = torch.tensor([[1, 5, 9, 9, 6, 5, 9, 9, 6, 1, 5, 9, 6, 0]])
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 3, 0]])
    assert item_numbers(ids, 5, pos).tolist() == [[0, 1, 1, 1, 1, 2, 2, 2, 2, 0, 1, 1, 1, 0]]
    assert item_numbers(ids, 5).tolist() == [[0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3]]  # one sample per row
    assert shared_span_positions(ids, pos, [9]).tolist() == [[0, 1, 2, 2, 4, 5, 6, 6, 8, 0, 1, 2, 3, 0]]


def test_tiny_preset_gives_each_item_its_number_and_image_span_one_position(tiny_model):
    m = tiny_model
    feats = m.encode_media(IMAGE, [image((255, 0, 0))] * 2)
    clip = m.encode_media(AUDIO, [tone(1.0)])
    content = "<image></image> <image></image> <audio></audio>"
    ids = torch.tensor([m.render([{"role": "user", "content": content}], feats + clip).input_ids])
    spans = (ids == m.pad_ids[IMAGE])[0].nonzero().flatten()
    first, second = spans[:16], spans[16:]
    positions = m.lm_positions(ids)[0]
    assert positions[first].unique().tolist() == [int(first[0])] and positions[second].unique().tolist() == [int(second[0])]
    # a clip's tokens are its time axis: they keep one position each
    audio = (ids == m.pad_ids[AUDIO])[0].nonzero().flatten()
    assert len(audio) > 1 and positions[audio].tolist() == audio.tolist()
    with torch.no_grad():
        embeds = m.embed(ids, feats, clip)[0]
    # the same image twice: its two spans differ by exactly the two item-number vectors
    table = m.item_ordinals.table.weight
    torch.testing.assert_close(embeds[second] - embeds[first], (table[1] - table[0]).expand(16, -1), atol=1e-5, rtol=0)


def test_packed_attention_matches_transformers_masked_sdpa(tiny_model):
    """mmm_packed_sdpa (per-sample slices) equals transformers' block-diagonal-mask SDPA, gradients too."""
    from mmm.attention import PACKED_SDPA, segment_bounds

    m = tiny_model
    assert m.llm.config._attn_implementation == PACKED_SDPA
    batch = collate_packed(_samples(m), context_length=160, pad_id=m.tokenizer.pad_token_id)
    assert any(len(b) > 1 for b in segment_bounds(batch["position_ids"], len(batch["rows"]), batch["input_ids"].shape[1]))
    runs = {}
    # transformers reads the equal positions of a shared span as sample starts: compare without them
    shared, m.config.llm.shared_span_positions = m.config.llm.shared_span_positions, []
    try:
        for impl in (PACKED_SDPA, "sdpa"):
            m.llm.set_attn_implementation(impl)
            m.zero_grad()
            inputs = (batch["input_ids"], batch["image_features"], batch["audio_features"])
            with torch.no_grad():
                logits = m(*inputs, position_ids=batch["position_ids"]).logits
            m(*inputs, labels=batch["labels"], position_ids=batch["position_ids"]).loss.backward()
            grads = [p.grad.clone() for p in m.parameters() if p.grad is not None]  # projectors: trainable
            runs[impl] = (logits, grads)
    finally:
        m.llm.set_attn_implementation(PACKED_SDPA)
        m.config.llm.shared_span_positions = shared
        m.zero_grad()
    torch.testing.assert_close(runs[PACKED_SDPA][0], runs["sdpa"][0], atol=1e-4, rtol=0)
    assert runs["sdpa"][1] and len(runs[PACKED_SDPA][1]) == len(runs["sdpa"][1])
    for mine, theirs in zip(runs[PACKED_SDPA][1], runs["sdpa"][1]):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)


def test_sample_bounds_are_worked_out_once_per_forward(tiny_model, monkeypatch):
    """Every layer gets the same position_ids; the bounds (a host sync on a GPU) are found once."""
    from mmm import attention

    m, calls = tiny_model, []
    real = attention.segment_bounds
    monkeypatch.setattr(attention, "segment_bounds", lambda *a: calls.append(1) or real(*a))
    batch = collate_packed(_samples(m), context_length=160, pad_id=m.tokenizer.pad_token_id)
    assert m.llm.config.num_hidden_layers > 1
    with torch.no_grad():
        first = m(batch["input_ids"], batch["image_features"], batch["audio_features"], position_ids=batch["position_ids"]).logits
        assert len(calls) == 1
        again = m(batch["input_ids"], batch["image_features"], batch["audio_features"],
                  position_ids=batch["position_ids"].clone()).logits  # a new tensor: worked out anew
    assert len(calls) == 2
    torch.testing.assert_close(first, again)


def test_padded_batch_matches_samples_alone(tiny_model):
    m = tiny_model
    samples = _samples(m, 3)
    batch = collate_padded(samples, pad_id=m.tokenizer.pad_token_id)
    with torch.no_grad():
        out = m(batch["input_ids"], batch["image_features"], batch["audio_features"],
                attention_mask=batch["attention_mask"]).logits
        for r, s in enumerate(samples):
            n = len(s["input_ids"])
            alone = m(torch.tensor([s["input_ids"]]), s["image_features"], s["audio_features"]).logits[0]
            torch.testing.assert_close(out[r, :n], alone, atol=1e-4, rtol=0)


def test_pad_waste_packed_vs_padded(tiny_model):
    samples = _samples(tiny_model, 5)
    packed, padded = collate_packed(samples, 160), collate_padded(samples)  # 5 samples, 258 tokens
    assert pad_waste(packed) < pad_waste(padded)
    print(f"pad waste: packed {pad_waste(packed):.1%}, padded {pad_waste(padded):.1%}")


def test_plan_bins_first_fit_decreasing():
    assert plan_bins([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    try:
        plan_bins([9], 8)
    except ValueError as e:
        assert "9 tokens" in str(e)
    else:
        raise AssertionError("an over-long sample must be refused")


def test_pack_stream_keeps_rows_full():
    import random

    from mmm.packing import pack_stream

    rng = random.Random(0)
    samples = [{"input_ids": [1] * n, "labels": [1] * n, "image_features": [], "audio_features": []}
               for n in (rng.randint(20, 200) for _ in range(400))]
    batches = list(pack_stream(iter(samples), context_length=256, rows_per_batch=4))
    assert sum(b["num_tokens"] for b in batches) == sum(len(s["input_ids"]) for s in samples)
    full = batches[:-2]  # the flushed tail may be short
    waste = 1 - sum(b["num_tokens"] for b in full) / sum(b["input_ids"].numel() for b in full)
    assert waste < 0.05, f"pad waste {waste:.1%}"
    assert all(b["input_ids"].shape[0] <= 4 for b in batches)
