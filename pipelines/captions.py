"""Stage 1's training pairs: every media row that has a caption or transcript, as a one-turn chat.

    pairs = caption_pairs(pq.read_table("<root>/media.parquet"))
    # [{"media_id", "modality", "lang", "messages": [user "<image></image>\\nDescribe the image.", assistant caption]}]

The user turn is a fixed short instruction in the row's language, so the projectors learn to
map features to the caption words (the paper's stage 1), not to follow varied instructions.
Eval media carry no text in the synthesized manifest, so they never appear here.
"""

from __future__ import annotations

import pyarrow as pa

from mmm.schema import AUDIO, IMAGE, MEDIA, check_columns

ASK = {
    IMAGE: {"en": "Describe the image.", "ms": "Terangkan gambar ini."},
    AUDIO: {"en": "Describe the audio.", "ms": "Terangkan audio ini."},
    "transcript": {"en": "What is said in the audio?", "ms": "Apakah yang disebut dalam audio ini?"},
}


def caption_pairs(media: pa.Table) -> list[dict]:
    check_columns(media, MEDIA, "the media table")
    pairs = []
    for r in media.to_pylist():
        text = r["transcript"] or r["caption"]
        if not text:
            continue
        lang = r["lang"] if r["lang"] in ("en", "ms") else "en"
        ask = ASK["transcript" if r["transcript"] else r["modality"]][lang]
        span = f"<{r['modality']}></{r['modality']}>"
        messages = [{"role": "user", "content": f"{span}\n{ask}"}, {"role": "assistant", "content": text}]
        pairs.append({"media_id": r["media_id"], "modality": r["modality"], "lang": lang, "messages": messages})
    return pairs
