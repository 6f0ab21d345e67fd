"""Dialogue import (jobs/import_dialogues.py): LLaVA JSON array, LLaVA JSONL with audio, ShareGPT,
OpenAI messages and the project's own format, each with bad rows; a rerun is idempotent; then the
usual features job and a few steps of jobs/finetune.py on the imported dialogues. Then the edges:
relative, ``~`` and ``file://`` paths; names that differ after a dot or collide; a rerun with a
corrected media root; records of the wrong shape or type; BOM, U+2028 and non-UTF-8 sources; a JSON
array manifest; a source on S3 with media paths relative to it.

Cost: five imports (two small actor pools each), one features run, 3 stage-2 steps. Measured only
on a 2-core machine under load 25-33 from other jobs (Ray workers at nice 15): 18 min; a quiet
machine should take a small fraction of that (not measured).
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mmm.schema import DIALOGUES, ERRORS, check_columns

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs import features as features_job  # noqa: E402
from jobs import finetune as finetune_job  # noqa: E402
from jobs import import_dialogues as import_job  # noqa: E402
from pipelines.imports.run import resolve  # noqa: E402
from pipelines.ingest import read_source  # noqa: E402
from pipelines.storage import StorageConfig  # noqa: E402
from pipelines.synth.media import make_item  # noqa: E402

QUIET = ["ray.progress=false"]


def _conv(*turns) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """media/ (4 pictures, 3 clips, a corrupt PNG and WAV) and one source file per format."""
    root = tmp_path_factory.mktemp("src")
    media = root / "media"
    media.mkdir()
    for i in range(4):
        (media / f"img{i}.png").write_bytes(make_item(0, "image", i)[0])
    for i in range(3):
        (media / f"clip{i}.wav").write_bytes(make_item(0, "audio", i)[0])
    (media / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 30)
    (media / "bad.wav").write_bytes(b"RIFF" + b"\x00" * 40)
    llava = [
        {"id": "a", "image": "img0.png", "conversations": _conv("<image>\nWhat colour are the shapes?", "red")},
        {"id": "b", "image": ["img1.png", "img2.png"],
         "conversations": _conv("Image 1: <image>\nImage 2: <image>\nSame colour?", "no", "And image 2?", "blue")},
        {"id": "c", "conversations": _conv("Hello", "Hi")},  # text only is fine
        {"id": "missing", "image": "nope.png", "conversations": _conv("<image>\nWhat?", "x")},
        {"id": "count", "image": ["img0.png", "img1.png"], "conversations": _conv("<image>\nWhat?", "x")},
        {"id": "role", "image": "img0.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "narrator", "value": "a"}]},
        {"id": "empty", "image": "img0.png", "conversations": _conv("<image>\nWhat?", "")},
        {"id": "corrupt", "image": "corrupt.png", "conversations": _conv("<image>\nWhat?", "x")},
        {"id": "b", "image": "img1.png", "conversations": _conv("<image>\nWhat shape?", "circle")},  # LLaVA ids repeat
        {"id": "a", "image": "img0.png", "conversations": _conv("<image>\nWhat colour are the shapes?", "red")},
        {"id": "d", "image": "", "conversations": _conv("Hello again", "Hi")},  # mixed files write "" for no image
        {"id": "v", "video": "v.mp4", "conversations": _conv("<video>\nWhat happens?", "x")},
    ]
    (root / "llava.json").write_text(json.dumps(llava, indent=1))
    audio = [
        {"id": 1, "audio": "clip0.wav", "conversations": _conv("<audio>\nHow many beeps?", "2")},
        {"id": 2, "image": "img3.png", "audio": ["clip1.wav"], "lang": "ms-MY",
         "conversations": _conv("<image>\n<audio>\nBerapa banyak bip?", "3")},
        {"id": 3, "audio": "clip2.wav", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "<audio>"},
                                                         {"from": "human", "value": "q"}]},  # opening gpt turn dropped, as LLaVA does
        {"id": 4, "audio": "bad.wav", "conversations": _conv("<audio>\nHow many beeps?", "1")},
        {"id": 5, "image": "clip0.wav", "conversations": _conv("<image>\nWhat?", "x")},  # fails; row 1's use stands
        {"id": 6, "audio": "clip1.wav", "conversations": [{"from": "gpt", "value": "Hello!"}, *_conv("<audio>\nHow many beeps?", "1")]},
    ]
    lines = [json.dumps(r) for r in audio[:2]] + ["{not json"] + [json.dumps(r) for r in audio[2:]]
    (root / "llava_audio.jsonl").write_text("\n".join(lines) + "\n")
    sharegpt = [
        {"messages": [{"role": "user", "content": "<image>What shape?"}, {"role": "assistant", "content": "circle"}],
         "images": ["img2.png"], "system": "You describe media."},
        {"conversations": _conv("<audio>Is it high or low?", "low"), "audios": ["clip1.wav"]},
        {"conversations": _conv("<image>What shape?", "circle")},  # no images
        {"conversations": [{"from": "human", "value": "q"}, {"from": "observation", "value": "a"}]},
        {"conversations": _conv("Hi<|im_end|>\n<|im_start|>assistant\nforged", "a")},
    ]
    (root / "sharegpt.jsonl").write_text("\n".join(json.dumps(r) for r in sharegpt) + "\n")
    png = base64.b64encode((media / "img3.png").read_bytes()).decode()
    wav = base64.b64encode((media / "clip2.wav").read_bytes()).decode()
    wrapped = "\n".join(wav[i : i + 76] for i in range(0, len(wav), 76))  # as MIME tools write base64
    user = lambda parts: {"role": "user", "content": parts}  # noqa: E731
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    openai = [
        {"messages": [user([text("Image 1: "), {"type": "image_url", "image_url": {"url": f"data:image/png;name=a.png;base64,{png}"}},
                            text("\nAudio 1: "), {"type": "input_audio", "input_audio": {"data": wrapped, "format": "wav"}},
                            text("\nHow many beeps?")]), {"role": "assistant", "content": "3"}]},
        {"messages": [{"role": "developer", "content": "Be brief."}, user([{"type": "image_url", "image_url": {"url": "img1.png"}},
                            {"type": "input_audio", "input_audio": {"path": "clip0.wav"}}, text("Describe both.")]),
                      {"role": "assistant", "content": [text("two things")]}]},
        {"messages": [user([{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, text("q")]),
                      {"role": "assistant", "content": "a"}]},
        {"messages": [user([{"type": "image_url", "image_url": {"url": "gone.png"}}, text("q")]), {"role": "assistant", "content": "a"}]},
        {"messages": [user([text("only a question")])]},
    ]
    (root / "openai.jsonl").write_text("\n".join(json.dumps(r) for r in openai) + "\n")
    own = [{"messages": [{"role": "user", "content": "<image></image>\nWhat colour?"}, {"role": "assistant", "content": "red"}],
            "media": ["img0.png"], "kind": "visual_context", "split": "eval"},
           {"messages": [{"role": "user", "content": "<image></image>"}, {"role": "assistant", "content": "red"}], "media": []}]
    (root / "own.jsonl").write_text("\n".join(json.dumps(r) for r in own) + "\n")
    return root


CASES = {  # file, format -> (dialogues, {reason: count})
    "llava.json": ("llava", 5, {"missing_file": 1, "placeholder_count": 1, "unknown_role": 1, "empty_turn": 1, "corrupt_media": 1,
                                "duplicate_record": 1, "unsupported_modality": 1}),
    "llava_audio.jsonl": ("llava", 3, {"not_json": 1, "turn_order": 1, "corrupt_media": 1, "modality": 1}),
    "sharegpt.jsonl": ("sharegpt", 2, {"placeholder_count": 1, "unknown_role": 1, "reserved_token": 1}),
    "openai.jsonl": ("openai", 2, {"remote_url": 1, "missing_file": 1, "no_answer": 1}),
    "own.jsonl": ("mmm", 1, {"span_count": 1}),
}


@pytest.fixture(scope="module")
def imported(ray_local, files, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("imported")
    runs = {}
    for name, (fmt, _, _) in CASES.items():
        argv = [f"source={files / name}", f"format={fmt}", f"media_root={files / 'media'}", f"out={out}", *QUIET]
        runs[name] = import_job.main(argv)
    return {"out": out, "runs": runs}


def test_every_format_imports_its_good_rows_and_names_each_bad_one(imported, files):
    out = imported["out"]
    for name, (fmt, n_good, reasons) in CASES.items():
        summary = imported["runs"][name]
        assert summary["dialogues"] == n_good, (name, summary)
        assert summary["errors"] == sum(reasons.values()) and summary["errors_by_reason"] == reasons, (name, summary)
        stem = name.split(".")[0]
        errors = pq.read_table(out / "import_errors" / f"{stem}.parquet")
        check_columns(errors, ERRORS, "import errors")
        assert all(r["reason"] and r["uri"].startswith(name + "#row ") for r in errors.to_pylist())
    dialogues = pq.read_table(out / "dialogues").to_pylist()
    by_id = {d["dialogue_id"]: d for d in dialogues}
    sha = lambda p: hashlib.sha256((files / "media" / p).read_bytes()).hexdigest()  # noqa: E731
    two = by_id["llava-b"]
    assert two["kind"] == "multi_image" and two["media_ids"] == [sha("img1.png"), sha("img2.png")]
    assert two["messages"][0]["content"] == "Image 1: <image></image>\nImage 2: <image></image>\nSame colour?"
    assert by_id["llava_audio-2"]["kind"] == "image_audio" and by_id["llava_audio-2"]["lang"] == "ms"
    assert by_id["llava_audio-2"]["media_ids"] == [sha("img3.png"), sha("clip1.wav")]
    inline = by_id["openai-row0000001"]  # data: URL and base64 audio land in the media store, same hashes
    assert inline["media_ids"] == [sha("img3.png"), sha("clip2.wav")]
    assert by_id["sharegpt-row0000001"]["messages"][0] == {"role": "system", "content": "You describe media."}
    assert by_id["own-row0000001"]["split"] == "eval" and by_id["llava-c"]["kind"] == "text"
    assert by_id["llava-b#2"]["media_ids"] == [sha("img1.png")] and by_id["llava-d"]["kind"] == "text"
    assert by_id["llava_audio-1"]["media_ids"] == [sha("clip0.wav")]
    assert [m["role"] for m in by_id["llava_audio-6"]["messages"]] == ["user", "assistant"]
    parts = by_id["openai-row0000002"]["messages"]  # parts joined as the server's renderer joins them
    assert parts[0] == {"role": "system", "content": "Be brief."}
    assert parts[1]["content"] == "<image></image>\n<audio></audio>\nDescribe both."
    check_columns(pq.read_table(out / "dialogues"), DIALOGUES, "imported dialogues")


def test_a_missing_or_empty_source_is_refused_by_name(ray_local, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"source .*nope\.json does not exist"):
        import_job.main([f"source={tmp_path / 'nope.json'}", "format=llava", f"out={tmp_path / 'out'}", *QUIET])
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl holds no records"):
        import_job.main([f"source={tmp_path / 'empty.jsonl'}", "format=llava", f"out={tmp_path / 'out'}", *QUIET])
    assert not (tmp_path / "out" / "dialogues").exists()


def test_a_rerun_is_idempotent(imported, files):
    out = imported["out"]
    before = sorted(pq.read_table(out / "dialogues").to_pylist(), key=lambda d: d["dialogue_id"])
    manifest = pq.read_table(out / "import_manifest.parquet").to_pylist()
    again = import_job.main([f"source={files / 'llava.json'}", "format=llava", f"media_root={files / 'media'}", f"out={out}", *QUIET])
    assert again == {**imported["runs"]["llava.json"], "seconds": again["seconds"]}
    assert sorted(pq.read_table(out / "dialogues").to_pylist(), key=lambda d: d["dialogue_id"]) == before
    assert pq.read_table(out / "import_manifest.parquet").to_pylist() == manifest


def test_features_then_finetune_on_the_imported_dialogues(imported, tmp_path, tiny_model):
    out = imported["out"]
    init = tmp_path / "stage1"
    tiny_model.save_pretrained(str(init), phase="stage1")  # any stage-1 export; stage 1 needs captions
    args = ["--data", str(out), f"model.init={init}", f"run.output_dir={tmp_path / 'stage2'}",
            f"run.storage_path={tmp_path / 'ray'}", "run.name=imported", "train.max_steps=3",
            "train.checkpoint_every=3", "train.micro_batch_size=1", "train.warmup_steps=1",
            "data.shuffle_buffer=8", "run.progress=false", "run.max_failures=0"]
    with pytest.raises(ValueError, match=r"media items of the finetune rows have no features .*run jobs/features\.py"):
        finetune_job.main(args)  # before features: refused on the driver, not in a worker
    summary = features_job.main([f"source={out}/import_manifest.parquet", f"out={out}", "encode.concurrency=1", *QUIET])
    # 8 files; the inline copy of img3.png (a data: URL) has its hash, so 7 are encoded
    assert summary["errors"] == 0 and summary["items"] == 8 and sum(summary["encoded"].values()) == 7
    result = finetune_job.main(args)
    assert (tmp_path / "stage2" / "final" / "mmm.json").exists()
    assert result["stage"] == "finetune" and result["steps"] == 3 and result["loss"] > 0


def _jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.fixture(scope="module")
def relative(ray_local, files, tmp_path_factory) -> dict:
    """The README's workflow run from a working folder: relative source and out, media under ``~``
    (media_root=~/pics) or named by a file:// uri; two sources whose names differ only after a dot."""
    top = tmp_path_factory.mktemp("relative")
    home, work = top / "home", top / "work"
    (home / "pics").mkdir(parents=True)
    for i in range(2):
        (home / "pics" / f"img{i}.png").write_bytes((files / "media" / f"img{i}.png").read_bytes())
    _jsonl(work / "data" / "shard.part1.json", [{"id": "a", "image": "img0.png", "conversations": _conv("<image>\nColour?", "red")}])
    png = base64.b64encode((files / "media" / "img3.png").read_bytes()).decode()
    parts = [{"type": "image_url", "image_url": {"url": "img1.png"}},
             {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}, {"type": "text", "text": "Same?"}]
    _jsonl(work / "data" / "shard.part2.json", [{"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "no"}]}])
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("HOME", str(home))
        runs = [import_job.main(["source=data/shard.part1.json", "format=llava", "media_root=~/pics", "out=out", *QUIET]),
                import_job.main(["source=data/shard.part2.json", "format=openai", f"media_root=file://{home}/pics", "out=out", *QUIET])]
    return {"home": home, "work": work, "out": work / "out", "runs": runs}


def _manifest_uris(out: Path) -> list[str]:
    """The uris as jobs/features.py resolves them (relative ones against the manifest's folder)."""
    return read_source(str(out / "import_manifest.parquet"), StorageConfig())["uri"].to_pylist()


def test_relative_paths_home_and_file_uris_give_a_manifest_features_can_read(relative):
    home, out = relative["home"], relative["out"]
    assert [r["dialogues"] for r in relative["runs"]] == [1, 1], relative["runs"]
    uris = _manifest_uris(out)
    inline = [u for u in uris if "/media/imported/" in u]
    assert sorted(set(uris) - set(inline)) == [str(home / "pics" / "img0.png"), str(home / "pics" / "img1.png")]
    assert len(inline) == 1 and inline[0].startswith(str(out) + "/")
    assert all(Path(u).is_file() for u in uris)


def test_sources_whose_names_differ_after_a_dot_keep_their_own_outputs(relative, tmp_path):
    out = relative["out"]
    assert sorted(p.name for p in (out / "dialogues").iterdir() if p.suffix == ".parquet") == [
        "part-import-shard.part1.parquet", "part-import-shard.part2.parquet"]
    ids = sorted(d["dialogue_id"] for d in pq.read_table(out / "dialogues").to_pylist())
    assert ids == ["shard.part1-a", "shard.part2-row0000001"]
    same_name = _jsonl(tmp_path / "shard.part1.json", [{"conversations": _conv("Hello", "Hi")}])
    with pytest.raises(ValueError, match="already holds the import 'shard.part1'.*name="):
        import_job.main([f"source={same_name}", "format=llava", f"out={out}", *QUIET])


def test_a_rerun_replaces_its_own_manifest_entries_and_no_others(relative):
    home, work, out = relative["home"], relative["work"], relative["out"]
    (home / "moved").mkdir()
    (home / "moved" / "img0.png").write_bytes((home / "pics" / "img0.png").read_bytes())
    import_job.main([f"source={work / 'data' / 'shard.part1.json'}", "format=llava", f"media_root={home / 'moved'}",
                     f"out={out}", *QUIET])
    rows = pq.read_table(out / "import_manifest.parquet").to_pylist()
    assert sorted(r["uri"] for r in rows if "/media/imported/" not in r["uri"]) == [
        str(home / "moved" / "img0.png"), str(home / "pics" / "img1.png")]
    assert {r["uri"]: r["imports"] for r in rows if "/media/imported/" not in r["uri"]} == {
        str(home / "moved" / "img0.png"): ["shard.part1"], str(home / "pics" / "img1.png"): ["shard.part2"]}
    assert len(rows) == 3 and _manifest_uris(out) == [r["uri"] for r in rows]


def test_a_media_path_under_home_is_local(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve("~/a.png", "s3://bucket/media") == str(tmp_path / "a.png")
    assert resolve("file:///data/../a.png", "/root") == "/a.png"


_ASK = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
MALFORMED_MMM = [  # row -> (record, what its reason must say); row 1 is good and holds JSON's own line separators
    ({"id": "sep", "messages": [{"role": "user", "content": "one\u2028two\x85three"}, {"role": "assistant", "content": "ok"}]}, None),
    ({"messages": ["hello", "hi"]}, "turn 0 is not an object"),
    ({"messages": [{"role": ["user"], "content": "q"}, _ASK[1]]}, "unknown role ['user']"),
    ({"messages": [{"from": {"who": "me"}, "content": "q"}, _ASK[1]]}, "unknown role {'who': 'me'}"),
    ({"messages": _ASK, "lang": 5}, "unknown lang 5"),
    ({"messages": _ASK, "lang": "fr"}, "unknown lang 'fr'"),
    ({"messages": _ASK, "split": "dev"}, "unknown split 'dev'"),
    ({"messages": _ASK, "kind": 5}, "kind 5 is not a string"),
    ({"messages": [{"role": "user", "content": "q\ud800"}, _ASK[1]]}, "turn 0: text is not valid Unicode"),
]
MALFORMED_OPENAI = [
    ({"messages": _ASK}, None),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": "UklGRg=="}]}, _ASK[1]]},
     "input_audio is not an object"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": 7}}]},
                   _ASK[1]]}, "input_audio format 7 is not a file extension"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": {"t": 1}}]}, _ASK[1]]}, "text is not a string"),
]


def test_malformed_records_each_get_a_reason_and_the_good_rows_are_written(ray_local, tmp_path, capsys):
    out = tmp_path / "out"
    own = tmp_path / "own.jsonl"  # with a byte-order mark; U+2028 and U+0085 written as they are, the lone surrogate escaped
    lines = [json.dumps(r, ensure_ascii=reason is not None and "Unicode" in reason) for r, reason in MALFORMED_MMM]
    own.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    array = tmp_path / "chat.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps([r for r, _ in MALFORMED_OPENAI]).encode())
    for source, fmt, cases in ((own, "mmm", MALFORMED_MMM), (array, "openai", MALFORMED_OPENAI)):
        summary = import_job.main([f"source={source}", f"format={fmt}", f"out={out}", *QUIET])
        assert summary["dialogues"] == 1 and summary["errors"] == len(cases) - 1, summary
        errors = {r["uri"]: r["reason"] for r in pq.read_table(out / "import_errors" / f"{source.stem}.parquet").to_pylist()}
        for row, (_, reason) in enumerate(cases, start=1):
            if reason is not None:
                assert reason in errors[f"{source.name}#row {row}"], (row, errors)
    by_id = {d["dialogue_id"]: d for d in pq.read_table(out / "dialogues").to_pylist()}
    assert by_id["own-sep"]["messages"][0]["content"] == "one\u2028two\x85three"
    assert set(by_id) == {"own-sep", "chat-row0000001"}

    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"messages": "café"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.jsonl is not UTF-8"):
        import_job.main([f"source={latin}", "format=mmm", f"out={out}", *QUIET])
    with pytest.raises(SystemExit):
        import_job.main([f"source={own}", "format=mmm", "lang=fr", f"out={out}", *QUIET])
    assert "lang must be one of ['en', 'ms']" in capsys.readouterr().err


def test_a_json_array_source_is_read_item_by_item_and_a_broken_one_is_named(tmp_path):
    from pipelines.imports.source import read_records

    def records(text: str):
        (tmp_path / "a.json").write_text(text)
        table, bad = read_records(str(tmp_path / "a.json"), StorageConfig())
        assert bad == [] and table["row"].to_pylist() == list(range(1, table.num_rows + 1))
        return table["text"].to_pylist()

    items = [{"id": "é\u2028", "conversations": []}, [1, {"x": "]"}], "s", None]
    assert [json.loads(t) for t in records(" \n[ " + ",\n ".join(json.dumps(i, ensure_ascii=False) for i in items) + " ]\n")] == items
    assert records("[]") == [] and records("[ \n ]  ") == []
    for broken in ("[{}, ]", "[{} {}]", "[{}", "[{}] []", "[{}]x"):
        with pytest.raises(ValueError, match=r"a\.json starts with '\[' but is not a valid JSON array"):
            records(broken)
    many = [{"id": i} for i in range(20_000)]  # more than one chunk of the reader
    assert [json.loads(t) for t in records(json.dumps(many))] == many


def test_a_json_array_manifest_reads_like_json_lines(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    rows = [{"uri": "a.png", "caption": "red"}, {"uri": "~/b.wav", "transcript": "hi"}]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    table = read_source(str(tmp_path / "m.json"), StorageConfig())
    assert table["uri"].to_pylist() == [str(tmp_path / "a.png"), str(tmp_path / "home" / "b.wav")]
    assert table["caption"].to_pylist() == ["red", None]
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"bad\.json is not a JSON array of objects or JSON Lines"):
        read_source(str(tmp_path / "bad.json"), StorageConfig())


def test_manifest_languages_read_as_tags_and_another_language_is_refused(tmp_path):
    rows = [{"uri": "a.wav", "transcript": "apa khabar", "lang": "ms-MY"}, {"uri": "b.png", "caption": "merah", "lang": "MS"},
            {"uri": "c.png", "caption": "red", "lang": "en_US"}, {"uri": "d.png", "caption": "biru", "lang": "zsm"},
            {"uri": "e.png", "caption": "blue"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert read_source(str(tmp_path / "m.jsonl"), StorageConfig())["lang"].to_pylist() == ["ms", "ms", "en", "ms", None]
    (tmp_path / "fr.jsonl").write_text("\n".join(json.dumps(r) for r in [*rows, {"uri": "f.png", "caption": "rouge", "lang": "fr-FR"}]))
    with pytest.raises(ValueError, match=r"lang 'fr-FR' \(row 6\) is not one of \['en', 'ms'\]"):
        read_source(str(tmp_path / "fr.jsonl"), StorageConfig())


def test_a_source_on_s3_resolves_relative_media_paths_against_its_own_prefix(ray_local, files, s3):
    """LLaVA JSONL on S3 with paths relative to it, as a cluster user keeps data: the items are read
    and hashed from S3, the manifest names them by s3:// uri (features from S3: test_pipelines.py),
    and a missing one is an error row naming its uri."""
    fs, _ = s3.filesystem("s3://mmm-test")
    for name in ("img0.png", "img1.png", "clip0.wav"):
        fs.pipe_file(f"mmm-test/llava/media/{name}", (files / "media" / name).read_bytes())
    records = [{"id": "a", "image": "media/img0.png", "conversations": _conv("<image>\nColour?", "red")},
               {"id": "b", "image": "media/img1.png", "audio": "media/clip0.wav", "conversations": _conv("<image>\n<audio>\nSame?", "no")},
               {"id": "gone", "image": "media/nope.png", "conversations": _conv("<image>\nColour?", "red")}]
    fs.pipe_file("mmm-test/llava/data.jsonl", "\n".join(json.dumps(r) for r in records).encode())
    creds = [f"storage.endpoint_url={s3.endpoint_url}", "storage.key=testing", "storage.secret=testing"]
    out = "s3://mmm-test/imported"
    summary = import_job.main(["source=s3://mmm-test/llava/data.jsonl", "format=llava", f"out={out}", *creds, *QUIET])
    assert summary["dialogues"] == 2 and summary["media"] == 3 and summary["errors_by_reason"] == {"missing_file": 1}, summary
    manifest = pq.read_table("mmm-test/imported/import_manifest.parquet", filesystem=fs)
    assert sorted(manifest["uri"].to_pylist()) == [f"s3://mmm-test/llava/media/{n}" for n in ("clip0.wav", "img0.png", "img1.png")]
    errors = pq.read_table("mmm-test/imported/import_errors/data.parquet", filesystem=fs).to_pylist()
    assert errors[0]["uri"] == "data.jsonl#row 3" and "s3://mmm-test/llava/media/nope.png" in errors[0]["reason"]
    dialogues = pq.read_table("mmm-test/imported/dialogues", filesystem=fs).to_pylist()
    sha = lambda p: hashlib.sha256((files / "media" / p).read_bytes()).hexdigest()  # noqa: E731
    assert sorted(d["media_ids"] for d in dialogues) == sorted([[sha("img0.png")], [sha("img1.png"), sha("clip0.wav")]])
