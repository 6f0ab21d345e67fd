"""The prefix KV cache, the renderer's media numbering and continuation, on the tiny preset
(random weights): a reused prefix decodes exactly as a full prefill does, a different image with
the same token ids never shares KV past its first placeholder, and the store is LRU-bounded."""

import re

import numpy as np
import pytest
import torch

from mmm.media import media_id
from serve.engine import MMMEngine, Prompt
from serve.openai_schema import SamplingParams
from serve.prefix_cache import PrefixCache, prompt_keys
from tests.helpers import image, tone

GREEDY = SamplingParams(temperature=0)


def _media(model, colours, clips=()):
    imgs = [image(c) for c in colours]
    feats = model.encode_media("image", imgs) + model.encode_media("audio", [tone(s, 300 + 200 * s) for s in clips])
    hashes = [media_id(np.asarray(img).tobytes()) for img in imgs] + [media_id(str(s).encode()) for s in clips]
    return feats, hashes


def _prompt(engine, messages, feats, hashes, n_images):
    ids = engine.render(messages, feats)
    return Prompt(ids, feats[:n_images], feats[n_images:], hashes)


def _decode(engine, prompt, steps=6):
    dec = engine.start([prompt], [GREEDY])
    out = [dec.step()[0] for _ in range(steps)]
    return out, dec.logits.clone()


def _chat(turns: int):
    """A growing conversation: each user turn shows one new image (then a clip) and asks about it."""
    msgs = []
    for t in range(turns):
        part = {"type": "image"} if t % 2 == 0 else {"type": "audio"}
        msgs += [{"role": "user", "content": [part, {"type": "text", "text": f"what colour is it {t}?"}]},
                 {"role": "assistant", "content": "red"}]
    return msgs[:-1]


def test_reused_prefix_decodes_as_a_full_prefill(tiny_model):
    on, off = MMMEngine(tiny_model, prefix_bytes=64 << 20), MMMEngine(tiny_model, prefix_bytes=0)
    feats, hashes = _media(tiny_model, [(255, 0, 0), (0, 0, 255)], clips=[1.0, 2.0])
    images, clips = feats[:2], feats[2:]
    shown = [(images[0], hashes[0]), (clips[0], hashes[2]), (images[1], hashes[1]), (clips[1], hashes[3])]
    for turns in (1, 2, 3, 4):  # _chat shows image, clip, image, clip
        f, h = [x for x, _ in shown[:turns]], [y for _, y in shown[:turns]]
        imgs, auds = images[: (turns + 1) // 2], clips[: turns // 2]
        toks_on, logits_on = _decode(on, Prompt(on.render(_chat(turns), f), imgs, auds, h))
        toks_off, logits_off = _decode(off, Prompt(off.render(_chat(turns), f), imgs, auds, h))
        assert toks_on == toks_off
        torch.testing.assert_close(logits_on, logits_off, atol=1e-4, rtol=1e-4)
    st = on.stats()
    assert st["hits"] == 3 and st["misses"] == 1 and st["reused_tokens"] > 0.5 * st["lookup_tokens"]
    assert st["entries"] == 1  # each turn's entry replaces the one it extends


def test_same_ids_different_image_never_share_kv_past_it(tiny_model):
    on, off = MMMEngine(tiny_model, prefix_bytes=64 << 20), MMMEngine(tiny_model, prefix_bytes=0)
    feats, hashes = _media(tiny_model, [(255, 0, 0), (0, 255, 0)])
    msgs = [{"role": "user", "content": [{"type": "text", "text": "what colour is the square?"}, {"type": "image"}]}]
    first = _prompt(on, msgs, feats[:1], hashes[:1], 1)
    second = _prompt(on, msgs, feats[1:], hashes[1:], 1)
    assert first.ids == second.ids  # same token ids: only the image differs
    _decode(on, first)
    toks, logits = _decode(on, second)
    ref, ref_logits = _decode(off, _prompt(off, msgs, feats[1:], hashes[1:], 1))
    assert toks == ref
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    pad = tiny_model.pad_ids["image"]
    assert on.stats()["reused_tokens"] == first.ids.index(pad)  # up to the first placeholder, not past it


def test_prompt_keys_follow_media_hashes():
    ids = [5, 7, 9, 9, 9, 8, 5, 9, 9, 8]
    a = prompt_keys(ids, ["aa" * 32, "bb" * 32], [9])
    b = prompt_keys(ids, ["aa" * 32, "cc" * 32], [9])
    assert list(a[:2]) == [5, 7] and (a[2:5] < 0).all() and len(set(a[2:5])) == 1
    assert list(np.flatnonzero(a != b)) == [7, 8]
    with pytest.raises(ValueError, match="2 media spans but 1"):
        prompt_keys(ids, ["aa" * 32], [9])


def test_store_is_lru_bounded_in_bytes():
    def kv(n):
        return [(torch.zeros(1, 1, n, 4), torch.zeros(1, 1, n, 4))]  # 32 bytes a token

    cache = PrefixCache(max_bytes=32 * 25)
    cache.store(np.arange(10), kv(10))
    cache.store(np.arange(100, 110), kv(10))
    assert cache.lookup(np.arange(5)).length == 4 and cache.lookup(np.arange(100, 120)).length == 10
    cache.store(np.arange(200, 210), kv(10))  # 30 tokens > 25: the least recently used (0..9) goes
    st = cache.stats()
    assert st["evictions"] == 1 and st["entries"] == 2 and st["bytes"] == 32 * 20
    assert cache.lookup(np.arange(5)) is None and cache.lookup(np.arange(200, 215)).length == 10
    cache.store(np.arange(200, 215), kv(15))  # extends an entry: replaces it
    assert cache.stats()["entries"] == 2 and cache.stats()["bytes"] == 32 * 25
    st = cache.stats()
    assert (st["hits"], st["misses"], st["reused_tokens"]) == (3, 1, 24)


def test_renderer_numbers_media_per_modality(tiny_model):
    tok = tiny_model.tokenizer
    feats, _ = _media(tiny_model, [(255, 0, 0), (0, 255, 0)], clips=[1.0])
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "<image></image> and?"}]
    text = tok.decode(tiny_model.render(msgs, [feats[0], feats[2], feats[1]], True).input_ids)
    assert text.index("Image 1: <image>") < text.index("Audio 1: <audio>") < text.index("Image 2: <image>")
    bare = tok.decode(tiny_model.render(msgs, [feats[0], feats[2], feats[1]], True, number_media=False).input_ids)
    assert "Image 1:" not in bare and "Audio 1:" not in bare


def test_trailing_assistant_message_is_continued(tiny_model):
    msgs = [{"role": "user", "content": "what colour?"}, {"role": "assistant", "content": "The colour is"}]
    ids = tiny_model.render(msgs, [], continue_final_message=True).input_ids
    closed = tiny_model.render(msgs, []).input_ids
    assert tiny_model.tokenizer.decode(ids).endswith("The colour is")
    assert closed[: len(ids)] == ids and len(closed) > len(ids)
    with pytest.raises(ValueError, match="continue_final_message"):
        tiny_model.render(msgs[:1], [], continue_final_message=True)


def test_training_dialogues_carry_bare_spans_that_the_renderer_numbers(tiny_model):
    """The offline synthesizer leaves numbering to the renderer, so a multi-image dialogue's
    "image 2" / "gambar 2" names the span rendered after "Image 2: ", as in a served request."""
    from pipelines.synth.media import make_item
    from pipelines.synth.offline import DialogueConfig, OfflineDialogues

    pool = {k: [(f"{k}{i}", make_item(0, k, i)[1]) for i in range(6)] for k in ("image", "audio")}
    gen = OfflineDialogues({"train": pool, "eval": pool}, DialogueConfig(num_dialogues=100), seed=7)
    rows = [gen.dialogue(i) for i in range(40)]
    users = [m["content"] for r in rows for m in r["messages"] if m["role"] == "user"]
    assert not any(re.search(r"(Image|Gambar|Audio|Picture) ?\d*: <", u) for u in users)  # no labels
    multi = next(r for r in rows if r["kind"] == "multi_image" and len(r["media_ids"]) >= 2)
    feats = tiny_model.encode_media("image", [image((255, 0, 0))] * len(multi["media_ids"]))
    text = tiny_model.tokenizer.decode(tiny_model.render(multi["messages"], feats).input_ids)
    assert "Image 1: <image>" in text and "Image 2: <image>" in text


def test_lookup_cost_does_not_grow_with_entries(monkeypatch):
    """300 conversations behind one shared system prompt: every lookup and store finds its own
    conversation's longest prefix (as a scan of every entry would) while comparing keys with at most
    ``CANDIDATES`` entries."""
    import serve.prefix_cache as pc

    def kv(n):
        return [(torch.zeros(1, 1, n, 1), torch.zeros(1, 1, n, 1))]

    rng = np.random.default_rng(0)
    system = np.arange(40)
    chats = [np.concatenate([system, rng.integers(1000, 9000, 30)]) for _ in range(300)]
    cache = PrefixCache(max_bytes=1 << 30)
    for chat in chats:
        cache.store(chat, kv(len(chat)))
    compared = []
    real = pc.common_prefix
    monkeypatch.setattr(pc, "common_prefix", lambda a, b: compared.append(1) or real(a, b))
    for k in (0, 150, 299):
        turn = np.concatenate([chats[k], rng.integers(1000, 9000, 25)])
        compared.clear()
        assert cache.lookup(turn).length == len(chats[k])
        assert len(compared) <= pc.CANDIDATES
        cache.store(turn, kv(len(turn)))  # extends chat k: replaces its entry
    assert cache.stats()["entries"] == 300
    assert cache.lookup(np.concatenate([system, [7, 7]])).length == len(system)  # shares the system prompt only


def test_rows_with_different_reused_prefixes_prefill_together(tiny_model):
    """Three prompts started together, two reusing cached prefixes of different lengths and one
    with none, decode exactly as each does alone without the cache (one batched LM call)."""
    from mmm.generation import StepDecoder

    on, off = MMMEngine(tiny_model, prefix_bytes=64 << 20), MMMEngine(tiny_model, prefix_bytes=0)
    feats, hashes = _media(tiny_model, [(255, 0, 0), (0, 0, 255)], clips=[1.0])
    images, clip = feats[:2], feats[2:]
    chats = [_chat(3), _chat(1), [{"role": "user", "content": "and with no media at all, what then?"}]]
    shown = [[images[0], clip[0], images[1]], [images[0]], []]  # in order of appearance, as rendered
    split = [([images[0], images[1]], clip, [hashes[0], hashes[2], hashes[1]]), ([images[0]], [], hashes[:1]),
             ([], [], [])]
    prompts = {name: [Prompt(e.render(c, f), imgs, auds, h) for c, f, (imgs, auds, h) in zip(chats, shown, split)]
               for name, e in (("on", on), ("off", off))}
    _decode(on, Prompt(on.render(_chat(2), shown[0][:2]), [images[0]], clip, [hashes[0], hashes[2]]))
    _decode(on, Prompt(on.render(_chat(1), shown[1]), [images[0]], [], hashes[:1]))  # shorter prefixes cached
    keys = [prompt_keys(p.ids, p.media, tiny_model.pad_ids.values()) for p in prompts["on"]]
    past = [on.prefix.lookup(keys[0]), on.prefix.lookup(keys[1]), None]
    assert past[0].length > past[1].length > 0
    together = StepDecoder(tiny_model, [(p.ids, p.images, p.audio) for p in prompts["on"]], [GREEDY] * 3, past)
    steps = [together.step() for _ in range(6)]
    for row, prompt in enumerate(prompts["off"]):
        alone, logits = _decode(off, prompt)
        assert [s[row] for s in steps] == alone
    torch.testing.assert_close(together.logits[2], logits[0], atol=1e-4, rtol=1e-4)
