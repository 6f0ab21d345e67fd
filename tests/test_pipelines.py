"""Ray Data pipelines on a local 4-logical-CPU Ray: synthesis, ingest, the feature store, S3.

One module-scoped Ray and one synthesized root (12 pictures, 8 beep clips, 60 dialogues) shared
by the tests below; the jobs run through their real entry points (``main(argv)``), in process.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mmm.config import SAMPLE_RATE, preset
from mmm.schema import AUDIO, DIALOGUES, ERRORS, IMAGE, KINDS, LANGS, MEDIA, check_columns

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs import features as features_job  # noqa: E402
from jobs import synthesize as synth_job  # noqa: E402
from pipelines.storage import StorageConfig  # noqa: E402
from pipelines.store import FeatureStore  # noqa: E402

QUIET = ["ray.progress=false"]
SMALL_SYNTH = ["offline.num_images=12", "offline.num_audio=8", "dialogues.num_dialogues=60",
               "dialogues.pool.concurrency=1", "dialogues.pool.batch_size=20", "offline.pool.concurrency=1"]
# One encoder actor on a 2-core box; parts of 8 rows so the store holds several.
SMALL_FEATURES = ["encode.concurrency=1", "encode.batch_size=8", "write.batch_size=8"]


@pytest.fixture(scope="module")
def root(ray_local, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    summary = synth_job.main([f"out={root}", *SMALL_SYNTH, *QUIET])
    assert summary["dialogues"] == 70 and summary["by_split"] == {"eval": 10, "eval_ood": 10, "train": 50}
    return root


@pytest.fixture(scope="module")
def featured(root) -> dict:
    """Features over a JSONL manifest: the 26 generated items (12 + 8, and the eval items' 3 + 3
    eval_ood twins), a corrupt PNG and a missing file."""
    bad = root / "bad"
    bad.mkdir()
    (bad / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 20)
    rows = pq.read_table(root / "manifest.parquet").select(["uri", "caption", "transcript", "lang"]).to_pylist()
    rows += [{"uri": "bad/corrupt.png"}, {"uri": "bad/missing.wav"}]
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return features_job.main([f"source={manifest}", f"out={root}", *SMALL_FEATURES, *QUIET])


def _store(root) -> FeatureStore:
    return FeatureStore(str(root / "features"), StorageConfig())


def _parts(root) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in (root / "features").glob("part-*.parquet")}


def test_feature_shapes_match_the_encoders(root, featured, tiny_model):
    cfg = preset("tiny")
    media = pq.read_table(root / "media.parquet")
    check_columns(media, MEDIA, "media.parquet")
    feats = _store(root).load()
    assert featured["encoded"] == {IMAGE: 15, AUDIO: 11} and len(feats) == 26
    patches = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    for row in {r["media_id"]: r for r in media.to_pylist()}.values():
        f = feats[row["media_id"]]
        if row["modality"] == IMAGE:
            assert f.shape == (patches, cfg.vision.hidden_size)
        else:
            frames = math.ceil(round(row["duration_s"] * SAMPLE_RATE) * 50 / SAMPLE_RATE)
            assert f.shape == (frames, cfg.audio.d_model)
    # The stored (half precision) tensor is what the frozen encoder computes for that file
    # (the pipeline decodes once and hands the encoder resized pixels or samples).
    from mmm.media import decode_audio, decode_image

    for modality, decode in ((IMAGE, decode_image), (AUDIO, decode_audio)):
        first = next(r for r in media.to_pylist() if r["modality"] == modality)
        direct = tiny_model.encode_media(modality, [decode(Path(first["uri"]).read_bytes())])[0].numpy()
        assert abs(direct - feats[first["media_id"]]).max() < 1e-2 * max(1.0, abs(direct).max())


def test_corrupt_and_missing_files_land_in_errors_and_the_rest_is_written(root, featured):
    errors = pq.read_table(root / "errors.parquet")
    check_columns(errors, ERRORS, "errors.parquet")
    by_uri = {Path(r["uri"]).name: r for r in errors.to_pylist()}
    assert set(by_uri) == {"corrupt.png", "missing.wav"}
    assert by_uri["corrupt.png"]["stage"] == "decode" and "image" in by_uri["corrupt.png"]["reason"]
    assert by_uri["missing.wav"]["stage"] == "read" and by_uri["missing.wav"]["reason"]
    media = pq.read_table(root / "media.parquet")
    assert len(set(media["media_id"].to_pylist())) == 26 and featured["errors"] == 2
    # train items once per language with a caption (stage 1 pairs); eval items without text
    captioned = media.filter(media["caption"].is_valid())
    assert set(captioned["lang"].to_pylist()) == {"en", "ms"}


def test_rerun_writes_nothing_new(root, featured):
    before = _parts(root)
    assert len(before) >= 2
    # Same bytes reached through another source (the media folder): every id is already stored.
    summary = features_job.main([f"source={root / 'media'}", f"out={root}", *SMALL_FEATURES, *QUIET])
    assert summary["encoded"] == {IMAGE: 0, AUDIO: 0} and summary["skipped"] == 26 and summary["parts_written"] == 0
    assert _parts(root) == before


def test_a_run_over_another_source_keeps_the_rows_of_earlier_ones(root, featured):
    """media.parquet and errors.parquet add up over sources; ``_``-prefixed files are media too."""
    extra = root / "extra"
    extra.mkdir()
    first = next(p for p in sorted((root / "media").rglob("*.png")))
    shutil.copyfile(first, extra / "_DSC0001.png")  # same bytes: nothing new to encode
    (extra / ".DS_Store").write_bytes(b"\0")
    summary = features_job.main([f"source={extra}", f"out={root}", *SMALL_FEATURES, *QUIET])
    assert summary["items"] == 1 and summary["errors"] == 0
    uris = pq.read_table(root / "media.parquet")["uri"].to_pylist()
    assert str(extra / "_DSC0001.png") in uris and len(uris) > 26
    errors = {Path(u).name for u in pq.read_table(root / "errors.parquet")["uri"].to_pylist()}
    assert {"corrupt.png", "missing.wav"} <= errors


def test_a_crashed_run_leaves_a_readable_store_and_the_rerun_completes_it(root, featured):
    parts = sorted((root / "features").glob("part-*.parquet"))
    lost = pq.read_table(parts[0])["media_id"].to_pylist()
    parts[0].unlink()  # the batch in flight when the run died: never committed
    tmp = root / "features" / "_tmp"
    tmp.mkdir(exist_ok=True)
    (tmp / "part-half.parquet.123").write_bytes(b"PAR1 half a file")  # an interrupted write
    store = _store(root)
    assert len(store.load()) == 26 - len(lost)  # readable: the half file is ignored
    summary = features_job.main([f"source={root / 'manifest.jsonl'}", f"out={root}", *SMALL_FEATURES, *QUIET])
    assert sum(summary["encoded"].values()) == len(lost) and summary["skipped"] == 26 - len(lost)
    assert len(store.table()) == len(store.index()) == 26  # complete, no duplicates


def _dialogues(root) -> list[dict]:
    table = pq.read_table(root / "dialogues")
    check_columns(table, DIALOGUES, "dialogues")
    return table.to_pylist()


def test_dialogues_cover_five_kinds_two_languages_and_eval_media_never_in_train(root):
    rows = _dialogues(root)
    for split in ("train", "eval"):
        assert {(r["kind"], r["lang"]) for r in rows if r["split"] == split} == {(k, lg) for k in KINDS for lg in LANGS}
    train = {m for r in rows if r["split"] == "train" for m in r["media_ids"]}
    evals = {m for r in rows if r["split"] == "eval" for m in r["media_ids"]}
    assert evals and not evals & train
    manifest = pq.read_table(root / "manifest.parquet").to_pylist()
    assert all(r["caption"] is None for r in manifest if r["media_id"] in evals)  # stage 1 never sees eval
    for r in rows:
        assert 1 <= len(r["messages"]) // 2 <= 4 and r["source"] == "offline"
        answers = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        # short: a fact ("segi tiga"), a named fact ("gambar 2 segi tiga"), a verdict after its facts
        assert all(1 <= len(a.split()) <= 5 for a in answers), answers
    assert any("image 2" in m["content"] or "gambar 2" in m["content"] for r in rows for m in r["messages"][2:])


def test_some_questions_stand_above_their_media(root):
    """Clients send both orders, so the training data has both: most turns that show media put
    the question below them, some above (``dialogues.question_first_rate``)."""
    showing = [m["content"] for r in _dialogues(root) for m in r["messages"]
               if m["role"] == "user" and "></" in m["content"]]
    above = [c for c in showing if not c.startswith("<")]
    assert 0.1 < len(above) / len(showing) < 0.4, (len(above), len(showing))
    assert all(c.endswith("\n") and "?\n<" in c for c in above)


def test_eval_ood_twins_ask_the_same_about_the_same_facts_drawn_otherwise(root):
    rows = {r["dialogue_id"]: r for r in _dialogues(root)}
    manifest = {r["media_id"]: r for r in pq.read_table(root / "manifest.parquet").to_pylist()}
    evals = [r for r in rows.values() if r["split"] == "eval"]
    assert evals and sum(r["split"] == "eval_ood" for r in rows.values()) == len(evals)
    for r in evals:
        twin = rows[r["dialogue_id"] + "-ood"]
        assert twin["split"] == "eval_ood" and twin["messages"] == r["messages"]
        for a, b in zip(r["media_ids"], twin["media_ids"]):
            assert a != b and manifest[a]["facts"] == manifest[b]["facts"] and manifest[b]["split"] == "eval_ood"
            assert manifest[b]["caption"] is None  # stage 1 never sees them


def test_eval_ood_draws_every_rendering_parameter_outside_the_training_ranges():
    """What a clip or picture shows, not only the configured intervals: a beep's start and a tone's
    frequency, and a colour with its per-channel jitter, out of every training draw's reach."""
    import dataclasses

    import numpy as np

    from pipelines.synth.media import OOD, TRAIN, Style, partly_ood, shade
    from pipelines.synth.words import COLOURS

    disjoint = lambda a, b: all(hi < low or lo > high for lo, hi in a for low, high in b)  # noqa: E731
    for field in dataclasses.fields(Style):
        if field.name not in ("jitter", "onset", "pitch"):
            assert disjoint(getattr(OOD, field.name), getattr(TRAIN, field.name)), field.name
    for fact, band in dict(OOD.pitch).items():
        assert disjoint([band], [dict(TRAIN.pitch)[fact]]), fact
    assert max(dict(OOD.pitch)["low"]) < min(dict(TRAIN.pitch)["high"])  # a low tone stays lower than any high one
    start = lambda style, tail, share: 0.05 + share * (tail - 0.1)  # noqa: E731
    latest_train = start(TRAIN, max(hi for _, hi in TRAIN.tail), TRAIN.onset[1])
    assert start(OOD, min(lo for lo, _ in OOD.tail), OOD.onset[0]) >= latest_train
    grid = lambda ranges: [t for lo, hi in ranges for t in np.linspace(lo, hi, 21)]  # noqa: E731
    reach = TRAIN.jitter + OOD.jitter
    for name, base in COLOURS.items():
        train = np.array([shade(base, t, None, 0) for t in grid(TRAIN.shade)])
        for t in grid(OOD.shade):
            ood = np.array(shade(base, t, None, 0))
            assert np.abs(train - ood).max(axis=1).min() > reach, (name, t)
    assert partly_ood(["beep", "tail"]) == dataclasses.replace(TRAIN, beep=OOD.beep, tail=OOD.tail)
    assert partly_ood([]) == OOD
    with pytest.raises(ValueError, match="bogus"):
        partly_ood(["bogus"])


def test_dialogues_render_with_the_core_renderer(root, featured, tiny_model):
    feats = _store(root).load()
    import torch

    for r in _dialogues(root):
        rendered = tiny_model.render(r["messages"], [torch.from_numpy(feats[m]) for m in r["media_ids"]])
        assert len(rendered.input_ids) <= tiny_model.config.llm.max_context
        assert any(label != -100 for label in rendered.labels)


def test_offline_generation_is_deterministic_for_a_seed():
    from pipelines.synth.media import make_item
    from pipelines.synth.offline import DialogueConfig, OfflineDialogues

    assert make_item(3, IMAGE, 5) == make_item(3, IMAGE, 5) and make_item(3, AUDIO, 1) == make_item(3, AUDIO, 1)
    assert make_item(3, IMAGE, 5)[0] != make_item(4, IMAGE, 5)[0]
    pool = {k: [(f"{k}{i}", make_item(0, k, i)[1]) for i in range(6)] for k in (IMAGE, AUDIO)}
    gen = OfflineDialogues({"train": pool, "eval": pool}, DialogueConfig(num_dialogues=100), seed=7)
    assert [gen.dialogue(i) for i in range(30)] == [gen.dialogue(i) for i in range(30)]


def _as_client_sends(text: str) -> list[dict]:
    """A message written with spans as an OpenAI client sends it: bare media parts and the text."""
    import re

    parts, at = [], 0
    for span in re.finditer(r"<(image|audio)></\1>\n?", text):
        question = text[at:span.start()].rstrip("\n")  # a question above its media, as a client types it
        parts += [{"type": "text", "text": question}] if question else []
        parts.append({"type": span.group(1)})
        at = span.end()
    return parts + ([{"type": "text", "text": text[at:]}] if at < len(text) else [])


def test_every_scored_prompt_is_what_a_client_sending_bare_parts_gets(root, featured, tiny_model):
    """No skew between evaluation and serving: each turn evaluation scores renders to the same ids
    when its history comes as an OpenAI client's bare parts."""
    import torch

    from mmm.chat import media_modalities

    feats = _store(root).load()
    turns = 0
    for r in _dialogues(root):
        media = [torch.from_numpy(feats[m]) for m in r["media_ids"]]
        client = [{**m, "content": _as_client_sends(m["content"])} if m["role"] == "user" else m for m in r["messages"]]
        for j, msg in enumerate(r["messages"]):
            if msg["role"] == "assistant":
                shown = media[: len(media_modalities(client[:j]))]
                scored = tiny_model.render(r["messages"][:j], shown, add_generation_prompt=True)
                served = tiny_model.render(client[:j], shown, add_generation_prompt=True)
                assert served.input_ids == scored.input_ids, (r["dialogue_id"], j)
                turns += 1
    assert turns > 100


def test_recall_drills_ask_about_an_earlier_item_in_train_only():
    import re

    from pipelines.synth.media import make_item
    from pipelines.synth.offline import DialogueConfig, OfflineDialogues
    from pipelines.synth.words import label

    pool = {k: [(f"{k}{i}", make_item(0, k, i)[1]) for i in range(6)] for k in (IMAGE, AUDIO)}
    make = lambda rate: OfflineDialogues({"train": pool, "eval": pool}, DialogueConfig(num_dialogues=200, recall_rate=rate), seed=7)  # noqa: E731
    plain, drilled = make(0.0), make(0.5)
    assert [plain.dialogue(i) for i in range(drilled.n_eval)] == [drilled.dialogue(i) for i in range(drilled.n_eval)]
    drills = 0
    for i in range(drilled.n_eval, 200):
        d = drilled.dialogue(i)
        if drilled._recall_kind(i) is None:
            assert d == plain.dialogue(i)  # the other train dialogues do not move
            continue
        drills += 1
        modality = IMAGE if d["kind"] == "multi_image" else AUDIO
        shown = sum(m["content"].count(f"<{modality}>") for m in d["messages"])
        # the question's line: above or below the spans of the media its turn shows
        question = next(line for line in d["messages"][-2]["content"].split("\n") if line and "></" not in line).lower()
        asked = [k for k in range(1, shown + 1) if re.search(rf"\b{label(modality, k, d['lang'])}\b", question)]
        assert asked and max(asked) < shown, (question, shown)
    assert 60 <= drills <= 120  # about half of 180 train dialogues


def test_an_eval_turn_never_asks_what_an_earlier_answer_said():
    """Evaluation feeds the reference answers back as history: a turn those answers already settle
    ("red", then "is it red?") would score reading, not the media. Checked on single-item
    dialogues, where an answer's words say which attribute it states."""
    from pipelines.synth.media import make_item
    from pipelines.synth.offline import DialogueConfig, OfflineDialogues
    from pipelines.synth.words import COLOURS, PITCHES, SHAPES, word

    groups = {a: {word(v, lg) for v in vs for lg in LANGS} for a, vs in
              (("colour", COLOURS), ("shape", SHAPES), ("pitch", PITCHES), ("count", ("1", "2", "3")))}

    def attributes(answer: str) -> set:
        return {a for a, ws in groups.items() for w in ws if f" {w} " in f" {answer.replace(',', ' ').replace('?', ' ')} "}

    pool = {k: [(f"{k}{i}", make_item(0, k, i)[1]) for i in range(6)] for k in (IMAGE, AUDIO)}
    gen = OfflineDialogues({"train": pool, "eval": pool}, DialogueConfig(num_dialogues=2000), seed=7)
    repeats = {"eval": 0, "train": 0}
    for d in map(gen.dialogue, range(2000)):
        if d["kind"] not in ("visual_context", "audio_instruction"):
            continue
        said: set = set()
        for answer in (m["content"] for m in d["messages"][1::2]):
            stated = attributes(answer)
            assert stated, answer
            repeats[d["split"]] += stated <= said
            said |= stated
    assert repeats["eval"] == 0 and repeats["train"] > 50, repeats  # train keeps them: reading history is a skill too


def test_yes_no_answers_state_what_they_compare_before_the_verdict():
    import random

    from pipelines.synth import questions as Q
    from pipelines.synth.media import make_item
    from pipelines.synth.offline import VALUES
    from pipelines.synth.words import word

    def items(kind, label):
        return [Q.Item(f"{kind}{i}", kind, make_item(0, kind, i)[1], {lg: f"{label[lg]} {i + 1}" for lg in LANGS}) for i in range(8)]

    def split(answer, lang):  # "red and blue, so no" -> (["red", "blue"], "no")
        facts, verdict = answer.split(f", {word('so', lang)} ")
        return facts.split(f" {word('and', lang)} "), verdict

    rng = random.Random(0)
    images, clips = items(IMAGE, {"en": "image", "ms": "gambar"}), items(AUDIO, {"en": "audio", "ms": "audio"})
    seen = set()
    for _ in range(200):
        lang = rng.choice(LANGS)
        yes, no = word("yes", lang), word("no", lang)
        item = rng.choice(images + clips)
        q, a, *_ = Q.verify(item, lang, rng, VALUES)
        claimed, rest = a.split("? ")  # "2? 3, so no": the claim echoed, then the fact
        [fact], verdict = split(rest, lang)
        assert claimed in q and fact in {Q._value(k, item.facts[k], lang) for k in VALUES if k in item.facts}, (q, a)
        assert verdict == (yes if claimed == fact else no), (q, a)
        seen.add(verdict)
        q, a, *_ = Q.same(rng.sample(images, 2), lang, rng)
        (left, right), verdict = split(a, lang)
        assert verdict == (yes if left == right else no), (q, a)
        image, clip = rng.choice(images), rng.choice(clips)
        (shapes, beeps), verdict = split(Q.cross(image, clip, lang)[1], lang)
        assert [shapes, beeps] == [str(image.facts["count"]), str(clip.facts["count"])]
        assert verdict == (yes if shapes == beeps else no)
    assert seen == {"yes", "no", "ya", "tidak"}  # both outcomes, both languages


def test_a_named_items_answer_starts_with_its_name():
    import random

    from pipelines.synth import questions as Q
    from pipelines.synth.media import make_item
    from pipelines.synth.offline import DialogueConfig, OfflineDialogues

    rng, facts = random.Random(0), make_item(0, IMAGE, 3)[1]
    named = Q.Item("i", IMAGE, facts, {"en": "image 2", "ms": "gambar 2"}, named=True)
    single = Q.Item("i", IMAGE, facts, {"en": "the image", "ms": "gambar ini"})
    for lang in LANGS:
        q, a, *_ = Q.attribute(named, lang, rng)
        assert named.ref[lang] in q and a.startswith(named.ref[lang] + " ") and a.split(" ", 2)[2], (q, a)
        q, a, *_ = Q.attribute(single, lang, rng)
        assert single.ref[lang] in q and not a.startswith(single.ref[lang]), (q, a)
    pool = {k: [(f"{k}{i}", make_item(0, k, i)[1]) for i in range(6)] for k in (IMAGE, AUDIO)}
    gen = OfflineDialogues({"train": pool, "eval": pool}, DialogueConfig(num_dialogues=100), seed=7)
    answers: dict = {}
    for d in map(gen.dialogue, range(50)):
        answers.setdefault(d["kind"], []).extend(m["content"] for m in d["messages"][1::2])
    named_facts = [a for a in answers["multi_image"] if a.startswith(("image ", "gambar ")) and "," not in a]
    assert any(len(a.split()) >= 3 for a in named_facts)  # "image 2 red", not only "which" answers ("image 2")
    assert not any(a.startswith(("image ", "gambar ", "audio ")) for a in answers["visual_context"] + answers["image_audio"])


def test_jobs_help_and_bad_keys():
    out = subprocess.run([sys.executable, "jobs/features.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "encode.num_gpus" in out.stdout and "Usage:" in out.stdout
    with pytest.raises(SystemExit):
        synth_job.main(["dialogues.nope=1"])


def test_local_ray_listens_on_loopback_only(ray_local):
    """What the tests and a job without RAY_ADDRESS start (pipelines.runtime.start_local_ray)."""
    from helpers import ray_listening_addresses

    addresses = ray_listening_addresses()
    assert addresses and addresses <= {"127.0.0.1", "::ffff:127.0.0.1"}, addresses


def test_s3_media_are_read_with_one_ranged_get_each_and_too_large_ones_refused(s3, monkeypatch):
    """No HEAD before each GET: a file is read up to one byte past the limit, and that byte says it
    is too large. Only an object the range read fails on (an empty one) is looked at again."""
    import dataclasses

    import pyarrow as pa
    import s3fs

    from mmm.media import MediaLimits
    from pipelines.ingest import ReadBytes

    fs, _ = s3.filesystem("s3://mmm-test")
    for name, size in (("ok", 1000), ("exact", 2048), ("big", 3000), ("empty", 0)):
        fs.pipe_file(f"mmm-test/reads/{name}.png", b"x" * size)
    looked_up = []
    info = s3fs.S3FileSystem._info
    monkeypatch.setattr(s3fs.S3FileSystem, "_info", lambda self, path, **kw: looked_up.append(path) or info(self, path, **kw))
    read = ReadBytes(s3, dataclasses.replace(MediaLimits(), max_image_bytes=2048, max_audio_bytes=1024))
    names = ["ok", "exact", "big", "missing", "empty"]
    got = read(pa.table({"uri": [f"s3://mmm-test/reads/{n}.png" for n in names], "modality": [IMAGE] * len(names)}))
    rows = dict(zip(names, got.select(["num_bytes", "error"]).to_pylist()))
    assert rows["ok"] == {"num_bytes": 1000, "error": None} and rows["exact"] == {"num_bytes": 2048, "error": None}
    assert "larger than any media item may be" in rows["big"]["error"] and rows["big"]["num_bytes"] is None
    assert "FileNotFoundError" in rows["missing"]["error"]
    assert rows["empty"]["num_bytes"] == 0
    assert all(p.endswith("empty.png") for p in looked_up), looked_up


def test_s3_round_trip_ingest_features_synthesis(ray_local, s3):
    from pipelines.ingest import read_source

    creds = [f"storage.endpoint_url={s3.endpoint_url}", "storage.key=testing", "storage.secret=testing"]
    root = "s3://mmm-test/run"
    small = ["offline.num_images=6", "offline.num_audio=6", "dialogues.num_dialogues=20",
             "dialogues.pool.concurrency=1", "offline.pool.concurrency=1"]
    synth_job.main([f"out={root}", *small, *creds, *QUIET])
    assert len(read_source(f"{root}/media/", s3)) == 18  # 6 + 6 and 3 + 3 eval_ood twins; an s3:// prefix lists as a source too
    summary = features_job.main([f"source={root}/manifest.parquet", f"out={root}", *SMALL_FEATURES, *creds, *QUIET])
    assert summary["encoded"] == {IMAGE: 9, AUDIO: 9} and summary["errors"] == 0
    llm = synth_job.main(["generator=llm", f"out={root}/llm", f"llm.media={root}/media.parquet", "llm.max_new_tokens=4",
                          "dialogues.num_dialogues=10", "llm.pool.batch_size=5", "llm.check=false", *creds, *QUIET])
    assert llm["dialogues"] == 10
    fs, _ = s3.filesystem(root)
    dialogues = pq.read_table("mmm-test/run/llm/dialogues", filesystem=fs).to_pylist()
    stored = set(FeatureStore(f"{root}/features", s3).index()["media_id"].to_pylist())
    for r in dialogues:
        spans = sum(m["content"].count("<image></image>") + m["content"].count("<audio></audio>") for m in r["messages"])
        assert r["source"] == "llm" and spans == len(r["media_ids"]) and set(r["media_ids"]) <= stored
        assert [m["role"] for m in r["messages"]][:2] == ["user", "assistant"]
