"""Spoken-phrase items: known transcripts, phrase-level held-out splits, unseen words, no-speech clips."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest

from pipelines.synth.speech import NO_SPEECH, UNSEEN, VOCAB, held_out, speech_facts


def test_every_word_is_in_one_vocabulary_and_unseen_words_are_not_trained():
    for lang in ("en", "ms"):
        assert len(set(VOCAB[lang])) >= 55, lang
        assert not set(UNSEEN[lang]) & set(VOCAB[lang]), lang


def test_the_real_recordings_say_only_words_english_training_says():
    from evaluation.speech import real_recordings

    recordings = real_recordings()
    if not recordings:
        pytest.skip("alsa-utils' recordings are not installed (apt-get install alsa-utils)")
    said = {w for _, transcript in recordings if transcript != NO_SPEECH["en"] for w in transcript.split()}
    assert said and said <= set(VOCAB["en"]), said - set(VOCAB["en"])
    train = {f["phrase"] for f in (speech_facts(0, i) for i in range(4000)) if f["split"] == "train"}
    assert not {t for _, t in recordings if t != NO_SPEECH["en"]} & train, "a recording's phrase was spoken in training"


def test_splits_share_no_phrase_and_training_never_says_an_unseen_word():
    items = [speech_facts(0, i) for i in range(4000)]
    train = {f["phrase"] for f in items if f["split"] == "train" and f["group"] != "none"}
    seen_eval = {f["phrase"] for f in items if f["split"] == "eval" and f["group"] == "seen"}
    unseen_eval = [f for f in items if f["split"] == "eval" and f["group"] == "unseen"]
    assert seen_eval and unseen_eval and not train & seen_eval
    assert all(held_out(p) for p in seen_eval) and not any(held_out(p) for p in train)
    unseen = {w for words in UNSEEN.values() for w in words}
    assert not {w for p in train for w in p.split()} & unseen
    assert all(set(f["phrase"].split()) & set(UNSEEN[f["lang"]]) for f in unseen_eval)
    counts = Counter((f["lang"], f["split"]) for f in items)
    assert counts["en", "eval"] == counts["ms", "eval"] == 250  # one clip in eight, per language
    silent = [f for f in items if f["group"] == "none"]
    assert silent and all(f["phrase"] == NO_SPEECH[f["lang"]] for f in silent)
    assert {1, 2, 3, 4} <= {len(f["phrase"].split()) for f in items if f["group"] == "seen"}
    assert len({f["voice"] for f in items if f["lang"] == "ms"}) >= 5, "Malay varies by voice variant"


def test_the_same_index_gives_the_same_facts():
    assert speech_facts(3, 17) == speech_facts(3, 17) != speech_facts(4, 17)


@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng is not installed (.ci/run installs it)")
def test_spoken_phrases_decode_as_audio_of_plausible_length():
    from mmm.config import SAMPLE_RATE
    from mmm.media import decode_audio
    from pipelines.synth.media import SPEECH, make_item

    lengths = {}
    for i in range(6):
        data, facts, ext = make_item(0, SPEECH, i)
        wave = decode_audio(data)
        assert ext == "wav" and facts["phrase"]
        lengths[facts["phrase"]] = len(wave) / SAMPLE_RATE
    assert all(0.4 < s < 8 for s in lengths.values()), lengths
