"""Tokenizers: the LM's own (extended with MMM's tokens) or a small one the project builds itself.

Every tokenizer MMM uses carries the same added tokens and the same chat template, so the
renderer, the trainer and the server never special-case a preset.
"""

from __future__ import annotations

import itertools

from .config import TokenizerConfig
from .pretrained import load_pretrained

IMAGE_START, IMAGE_END, IMAGE_PAD = "<image>", "</image>", "<|image_pad|>"
AUDIO_START, AUDIO_END, AUDIO_PAD = "<audio>", "</audio>", "<|audio_pad|>"
TURN_START, TURN_END = "<|im_start|>", "<|im_end|>"
PAD, BOS = "<|pad|>", "<|bos|>"
MEDIA_TOKENS = [IMAGE_START, IMAGE_END, IMAGE_PAD, AUDIO_START, AUDIO_END, AUDIO_PAD]

# ChatML-style turns: one template for every preset, since stage 2 teaches it anyway. The
# {% generation %} markers let `return_assistant_tokens_mask` find the tokens that carry loss:
# an assistant turn's content and its closing <|im_end|> (so the model learns to stop).
CHAT_TEMPLATE = (
    # a tokenizer whose bos IS the turn opener (SmolLM2's <|im_start|>) must not get it twice
    "{% if bos_token and bos_token != '<|im_start|>' %}{{ bos_token }}{% endif %}"
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ m['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Words of the tiny preset's world, in both languages, so its BPE has whole-word merges for them.
_EN = (
    "image picture audio clip sound tone beep voice speech colour color shape circle square "
    "triangle star red green blue yellow purple orange black white high low pitch how many what "
    "which is the a an of in and or yes no one two three four five there are does do this that "
    "same different first second third both louder higher lower describe answer question what's "
    "hear see show shows heard seen it they count number kind shapes beeps has have as so user assistant system"
).split()
_MS = (
    "gambar imej audio klip bunyi nada bip suara pertuturan warna bentuk bulatan segi empat tiga "
    "bintang merah hijau biru kuning ungu oren hitam putih tinggi rendah berapa apakah yang mana "
    "ini itu ada dan atau ya tidak satu dua tiga empat lima sama berbeza pertama kedua ketiga "
    "kedua-dua lebih dengar lihat menunjukkan didengar dilihat bilangan jenis jawab soalan adakah banyak "
    "berwarna dalam dengan manakah mempunyai jadi"
).split()


def _corpus() -> list[str]:
    """Deterministic English + Malay text the project owns (no download)."""
    lines = []
    for words in (_EN, _MS):
        words = words + [w.capitalize() for w in words]  # sentence starts and labels ("Image 1:")
        for n in (1, 2, 3):
            lines += [" ".join(c) for c in itertools.islice(itertools.permutations(words, n), 0, 14_000, 7)]
    lines += [f"{w} {i}" for w in ("image", "gambar", "audio", "picture") for i in range(1, 10)]
    return lines


def build_tiny_tokenizer(vocab_size: int = 2048):
    """A byte-level BPE trained on the project's own bilingual text; same result on every run."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # A word is one token wherever it stands. Byte-level BPE glues the space before a word into
    # its token ("Ġblue"), but an answer follows "assistant\n" with no space ("blue"): the word
    # the model learns to say and the same word in a question ("Are the shapes blue?") would be
    # unrelated tokens, and every yes/no or "which image" question would have to learn the pair
    # from scratch (they sit near chance while "what colour" is 100%: docs/LEARNING.md#tokenizer).
    # So a line that starts with a word gets a space; decoding takes it away again, after each line
    # break and before the text. A line the writer did start with a space loses that one space: the
    # two encode alike, and lines that start with a word are the ones that occur.
    tok.normalizer = normalizers.Replace(Regex(r"\n(?=\S)"), "\n ")
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("\n ", "\n"), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, TURN_START, TURN_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=TURN_END)
    return extend_tokenizer(fast)


def extend_tokenizer(tokenizer):
    """Add MMM's media and turn tokens and the chat template to any HF tokenizer.

    Tokens the tokenizer already has (SmolLM2's ``<|im_start|>``/``<|im_end|>``) keep their ids, so
    the LM's vocabulary grows only by the really new ones."""
    tokenizer.add_special_tokens({"additional_special_tokens": MEDIA_TOKENS + [TURN_START, TURN_END]})
    tokenizer.pad_token = choose_pad_token(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def choose_pad_token(tokenizer) -> str:
    """A pad that never stands for a token the model must learn to say: a pretrained tokenizer's pad
    is often its end-of-turn token (SmolLM2, TinyLlama), so its unused unk token is taken instead,
    and a new <|pad|> only when there is neither."""
    ends = {TURN_END, tokenizer.eos_token, tokenizer.bos_token, TURN_START}
    for candidate in (tokenizer.pad_token, tokenizer.unk_token):
        if candidate is not None and candidate not in ends:
            return candidate
    tokenizer.add_special_tokens({"pad_token": PAD})
    return PAD


def load_tokenizer(cfg: TokenizerConfig, llm_name: str | None):
    """The tokenizer a fresh model uses: a named one, the LM's own, or the tiny BPE."""
    name = cfg.pretrained or llm_name
    if name is None:
        return build_tiny_tokenizer(cfg.vocab_size)
    from transformers import AutoTokenizer

    return extend_tokenizer(load_pretrained(AutoTokenizer.from_pretrained, name, "tokenizer"))


def mmm_token_ids(tokenizer) -> list[int]:
    """Ids of the tokens MMM writes itself (media tags, turn markers): the rows a pretrained LM must
    learn. The placeholders are left out: their embeddings are always replaced by features."""
    names = [IMAGE_START, IMAGE_END, AUDIO_START, AUDIO_END, TURN_START, TURN_END]
    return sorted({tokenizer.convert_tokens_to_ids(t) for t in names})


def stop_token_ids(tokenizer) -> list[int]:
    """Tokens that end an assistant turn."""
    ids = {tokenizer.convert_tokens_to_ids(TURN_END)}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)
