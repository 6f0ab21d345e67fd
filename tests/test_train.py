"""Stage 1 -> stage 2 -> evaluate on local Ray (2 CPU workers, DeepSpeed ZeRO-2, the tiny preset).

A small data root is made in process with the offline generator's own pieces (its media with
known facts, its dialogue maker, its manifest) and the tiny preset's frozen encoders, so no Ray
Data start-up is paid here (tests/test_pipelines.py covers those jobs). Four ``trainer.fit`` calls
in all: stage 1 interrupted by an injected failure after its step-2 checkpoint; stage 1 resumed
through the real entry point (``jobs/pretrain.py --resume``); stage 2 over dialogues in eight
Parquet files, with rank 0 fed only image dialogues and rank 1 only audio dialogues; the same
stage 2 again, which must train the same model. Then jobs/evaluate.py on the stage-2 export.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs import evaluate as evaluate_job  # noqa: E402
from jobs import finetune as finetune_job  # noqa: E402
from jobs import pretrain as pretrain_job  # noqa: E402
from training import rows as rows_mod  # noqa: E402
from training import stages  # noqa: E402
from training.presets import job_defaults  # noqa: E402
from training.metrics import read_jsonl  # noqa: E402
from mmm.checkpoint import CheckpointError  # noqa: E402
from mmm.schema import KINDS, LANGS, MEDIA  # noqa: E402
from pipelines.runtime import start_local_ray  # noqa: E402

NUM_IMAGES, NUM_AUDIO, NUM_DIALOGUES = 24, 12, 200
IMAGE_KINDS = ("visual_context", "multi_image")
AUDIO_KINDS = ("audio_instruction", "multi_audio")
STEPS1, STEPS2 = 4, 8


# ---- a tiny data root, made in process ---------------------------------------------------------


def make_root(root: Path, model) -> None:
    """media.parquet, features/ and dialogues/ as jobs/synthesize.py + jobs/features.py lay them out."""
    from mmm.media import decode_audio, decode_image, media_id
    from mmm.schema import encode_tensor
    from pipelines.storage import StorageConfig
    from pipelines.store import FeatureStore
    from pipelines.synth.generate import manifest_table
    from pipelines.synth.media import make_item
    from pipelines.synth.offline import DialogueConfig, OfflineDialogues, pools_from_manifest

    items, feats = [], []
    for kind, n, decode in (("image", NUM_IMAGES, decode_image), ("audio", NUM_AUDIO, decode_audio)):
        made = [make_item(0, kind, i) for i in range(n)]
        encoded = model.encode_media(kind, [decode(data) for data, _, _ in made])
        for i, ((data, facts, ext), f) in enumerate(zip(made, encoded)):
            mid = media_id(data)
            split = "eval" if i < max(3, round(0.1 * n)) else "train"
            items.append(dict(uri=f"media/{kind}/{i:06d}.{ext}", modality=kind, kind=kind, index=i, media_id=mid,
                              facts=json.dumps(facts), split=split))
            encoder = model.vision.name if kind == "image" else model.audio.name
            feats.append(dict(media_id=mid, modality=kind, encoder=encoder, **encode_tensor(f.numpy())))
    FeatureStore(str(root / "features"), StorageConfig()).write_part(pa.Table.from_pylist(feats))
    manifest = manifest_table(items)
    media = manifest.select(["media_id", "modality", "uri", "caption", "transcript", "lang"])
    for name in ("num_bytes", "width", "height", "duration_s"):
        media = media.append_column(name, pa.nulls(len(media), MEDIA.field(name).type))
    pq.write_table(media.select(MEDIA.names).cast(MEDIA), root / "media.parquet")
    maker = OfflineDialogues(pools_from_manifest(items), DialogueConfig(num_dialogues=NUM_DIALOGUES), seed=0)
    (root / "dialogues").mkdir()
    pq.write_table(maker(pa.table({"index": list(range(NUM_DIALOGUES))})), root / "dialogues" / "part-0.parquet")


# ---- hooks that shape the runs (pickled by value into the workers) -------------------------------


def interrupted_batches(model, cfg, rows, marker: str, at: int, seen: list):
    """Rank 1 fails once at its ``at``-th micro-batch (counted across epochs), like a killed job."""
    for batch in rows_mod.packed_batches(model, cfg, rows):
        seen[0] += 1
        if seen[0] == at and torch.distributed.get_rank() == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError("injected interruption")
        yield batch


def batches_by_modality(model, cfg, rows):
    """Rank 0 trains only on image dialogues, rank 1 only on audio ones: every step, each rank runs
    one projector for real and the other as a zero-weighted dummy."""
    keep = IMAGE_KINDS if torch.distributed.get_rank() == 0 else AUDIO_KINDS
    yield from rows_mod.packed_batches(model, cfg, (r for r in rows if r["kind"] in keep))


def _hooks(make_batches):
    """The stages' own hooks with another way of making micro-batches."""
    import dataclasses

    return dataclasses.replace(stages.hooks(), make_batches=make_batches)


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    start_local_ray(num_cpus=4, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"),
                    logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model):
    work = tmp_path_factory.mktemp("train")
    (work / "data").mkdir()
    make_root(work / "data", tiny_model)
    return work


def _args(work: Path, stage: str, steps: int, every: int, out: str | None = None, data: Path | None = None) -> list[str]:
    out = out or ("stage1" if stage == "pretrain" else "stage2")
    return ["--data", str(data or work / "data"), f"run.output_dir={work / out}", f"run.storage_path={work / 'ray'}",
            f"run.name={out}", f"train.max_steps={steps}", f"train.checkpoint_every={every}", "train.log_every=1",
            "train.warmup_steps=1", "train.micro_batch_size=1", "data.shuffle_buffer=16", "run.progress=false",
            "run.max_failures=0"]


@pytest.fixture(scope="module")
def stage1(ray_local, work):
    """Stage 1 interrupted on rank 1 in step 3 (after the step-2 checkpoint), then ``--resume``d."""
    cfg, _, _ = stages.parse_args("pretrain", _args(work, "pretrain", STEPS1, 2), "")
    hooks = _hooks(functools.partial(interrupted_batches, marker=str(work / "interrupted"), at=3, seen=[0]))
    with pytest.raises(Exception, match="injected interruption"):
        stages.run(cfg, train_hooks=hooks)
    summary = pretrain_job.main([*_args(work, "pretrain", STEPS1, 2), "--resume"])
    return SimpleNamespace(cfg=cfg, summary=summary, final=work / "stage1" / "final",
                           log=read_jsonl(str(work / "stage1" / "metrics.jsonl")))


def _many_parts(work: Path, parts: int = 8) -> Path:
    """The test data root with its dialogues cut into ``parts`` Parquet files: blocks for Ray Data to hand out."""
    root = work / f"data_{parts}_parts"
    if not root.exists():
        (root / "dialogues").mkdir(parents=True)
        for name in ("features", "media.parquet"):
            (root / name).symlink_to(work / "data" / name)
        table = pq.read_table(work / "data" / "dialogues")
        size = -(-table.num_rows // parts)
        for i in range(parts):
            pq.write_table(table.slice(i * size, size), root / "dialogues" / f"part-{i}.parquet")
    return root


def run_stage2(stage1, work: Path, name: str) -> SimpleNamespace:
    """Stage 2 over the data root cut into eight files (blocks for Ray Data to hand out), each rank
    fed one modality; ``name`` picks the run's folders and nothing else."""
    # the test's own rate: 8 steps must move the loss whatever rate the preset's 1600-step recipe uses
    argv = [*_args(work, "finetune", STEPS2, STEPS2, name, _many_parts(work)), f"model.init={stage1.final}", "train.lr=2e-3"]
    cfg, _, _ = stages.parse_args("finetune", argv, "")
    result = stages.run(cfg, train_hooks=_hooks(batches_by_modality))
    return SimpleNamespace(cfg=cfg, summary=result, final=work / name / "final",
                           log=read_jsonl(str(work / name / "metrics.jsonl")))


@pytest.fixture(scope="module")
def stage2(stage1, work):
    return run_stage2(stage1, work, "stage2")


def _state(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- tests ---------------------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_stage1_resumes_from_the_saved_step(stage1):
    starts = [r for r in stage1.log if r.get("event") == "start"]
    steps = [r["step"] for r in stage1.log if "loss" in r]
    assert [r["start_step"] for r in starts] == [0, 2], "the resumed run must continue from the step-2 checkpoint"
    assert steps == list(range(1, STEPS1 + 1)), "history up to the checkpoint, then the resumed steps, no repeats"
    assert starts[1]["param_norm"] == pytest.approx(next(r for r in stage1.log if r.get("step") == 2)["param_norm"], rel=1e-6)
    assert stage1.summary["steps"] == STEPS1


@pytest.mark.timeout(900)
def test_stage1_trains_only_the_projectors_and_stores_feature_statistics(stage1, work):
    from mmm.model import MMMModel

    fresh = MMMModel.build(stages.model_config(stage1.cfg))  # what every worker started from
    trained = MMMModel.from_pretrained(str(stage1.final), expect_phase="stage1")
    for part in ("llm", "vision", "audio"):
        assert _equal(_state(getattr(fresh, part)), _state(getattr(trained, part))), f"stage 1 changed the {part}"
    assert set(fresh.projector_parts()) == {"vision_projector", "audio_projector", "item_ordinals"}
    for proj in fresh.projector_parts():
        before, after = _state(getattr(fresh, proj)), _state(getattr(trained, proj))
        weights = [k for k in before if not k.startswith("norm.")]
        assert all(not torch.equal(before[k], after[k]) for k in weights), f"{proj} did not train"
    # FeatureNorm: statistics of the training features (eval media excluded), computed before step 1.
    cfg = stages.absolute_paths(stage1.cfg)
    index = rows_mod.load_index(cfg.data.features, (fresh.vision.name, fresh.audio.name),
                                rows_mod.train_media_ids(cfg), rows_mod._storage(cfg))
    mean, std = rows_mod.feature_stats(index.of("image"), fresh.vision_projector.norm.positions)
    assert torch.allclose(trained.vision_projector.norm.mean, mean) and torch.allclose(trained.vision_projector.norm.std, std)
    assert not torch.equal(trained.audio_projector.norm.std, fresh.audio_projector.norm.std)
    assert len(index) == (NUM_IMAGES - 3) + (NUM_AUDIO - 3)


@pytest.mark.timeout(900)
def test_stage2_starts_from_stage1_and_mixed_modality_ranks_finish(stage1, stage2):
    from mmm.model import MMMModel

    assert stage2.summary["steps"] == STEPS2, "a rank with only image rows and one with only audio rows must not hang"
    s1 = MMMModel.from_pretrained(str(stage1.final))
    threads = torch.get_num_threads()
    start = stages.build_model(stages.absolute_paths(stage2.cfg))  # exactly what each stage-2 worker builds
    torch.set_num_threads(threads)
    s2 = MMMModel.from_pretrained(str(stage2.final), expect_phase="stage2")
    for proj in s1.projector_parts():
        assert _equal(_state(getattr(s1, proj)), _state(getattr(start, proj))), f"stage 2 did not start from stage 1's {proj}"
    for proj in ("vision_projector", "audio_projector"):
        for buf in ("norm.mean", "norm.std"):  # statistics travel unchanged to the final model
            assert torch.equal(getattr(s1, proj).state_dict()[buf], getattr(s2, proj).state_dict()[buf])
        assert not torch.equal(getattr(s1, proj).state_dict()["linear_1.weight" if proj[0] == "v" else "conv.weight"],
                               getattr(s2, proj).state_dict()["linear_1.weight" if proj[0] == "v" else "conv.weight"])
    assert not _equal(_state(s1.llm), _state(s2.llm)), "stage 2 trains the LM"
    assert _equal(_state(s1.vision), _state(s2.vision)) and _equal(_state(s1.audio), _state(s2.audio))


@pytest.mark.timeout(900)
def test_loss_falls(stage2):
    losses = [r["loss"] for r in stage2.log if "loss" in r]
    assert len(losses) == STEPS2
    assert losses[-1] < 0.75 * losses[0], losses


@pytest.mark.timeout(900)
def test_a_rerun_with_the_same_seed_trains_the_same_model(stage1, stage2, work):
    """Stage 2 again, same seed and workers, over the same eight files: the same losses at every step
    and the same weights at the end (``data.preserve_order``)."""
    from mmm.model import MMMModel

    rerun = run_stage2(stage1, work, "stage2-rerun")
    losses = [[r["loss"] for r in run.log if "loss" in r] for run in (stage2, rerun)]
    assert len(losses[0]) == STEPS2 and losses[0] == losses[1], losses
    first, second = (_state(MMMModel.from_pretrained(str(run.final), expect_phase="stage2")) for run in (stage2, rerun))
    assert _equal(first, second), "the same seed, data and workers must end with the same weights"


def test_rows_too_long_for_the_context_are_skipped_and_counted(stage1, work, tiny_model):
    """packed_batches drops dialogues longer than train.context_length and each batch says how many
    it dropped since the one before; the loop sums them into metrics.jsonl (tests/test_train_loop.py)."""
    rows = [r for r in pq.read_table(work / "data" / "dialogues").to_pylist() if r["split"] == "train"][:60]
    cfg, _ = stages.job_config("finetune", str(work / "data"), None, [f"model.init={stage1.final}", "train.micro_batch_size=2"])
    index = rows_mod.worker_index(tiny_model, cfg)
    lengths = sorted(len(rows_mod.render_row(tiny_model, r, index)["input_ids"]) for r in rows)
    context = lengths[len(lengths) // 2]
    cfg, _ = stages.job_config("finetune", str(work / "data"), None,
                               [f"model.init={stage1.final}", "train.micro_batch_size=2", f"train.context_length={context}"])
    batches = list(rows_mod.packed_batches(tiny_model, cfg, rows))
    too_long = sum(n > context for n in lengths)
    assert 0 < too_long < len(rows)
    assert sum(b["skipped_rows"] for b in batches) == too_long
    assert sum(int(b["num_tokens"]) for b in batches) == sum(n for n in lengths if n <= context)


def test_stage2_refuses_a_checkpoint_of_another_phase(stage2, work, capsys):
    args = [*_args(work, "finetune", 1, 1), "run.name=refused"]
    with pytest.raises(CheckpointError, match="stage1"):
        finetune_job.main([*args, f"model.init={stage2.final}"])
    with pytest.raises(SystemExit) as e:  # no checkpoint there at all: a usage error naming it
        finetune_job.main([*args, f"model.init={work / 'missing'}"])
    assert e.value.code == 2 and "not an MMM checkpoint" in capsys.readouterr().err
    assert not (work / "ray" / "refused").exists(), "refused before any worker started"


@pytest.mark.timeout(600)
def test_evaluate_writes_every_kind_and_both_languages(stage1, stage2, work):
    out = work / "eval"
    result = evaluate_job.main([f"model={stage2.final}", f"data={work / 'data'}", f"out={out}",
                                f"metrics=[{work}/stage1/metrics.jsonl, {work}/stage2/metrics.jsonl]"])
    saved = json.loads((out / "eval.json").read_text())
    assert saved["overall"] == result["overall"] and 0.0 <= saved["overall"] <= 1.0
    assert set(saved["by_kind"]) == set(KINDS) and set(saved["by_lang"]) == set(LANGS)
    assert math.isfinite(saved["loss"]) and saved["counts"]["turns"] >= saved["counts"]["dialogues"] == NUM_DIALOGUES // 10
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "loss.png").stat().st_size > 0


def test_the_models_loss_equals_the_lms_own_loss_over_every_position(stage1, work, tiny_model):
    """The one loss path (the head only on labelled positions) equals transformers' causal-LM loss,
    which runs the head at every position and ignores the unlabelled ones."""
    from mmm.packing import model_inputs, pack_stream

    cfg, _, _ = stages.parse_args("finetune", [*_args(work, "finetune", 1, 1), f"model.init={stage1.final}"], "")
    cfg = stages.absolute_paths(cfg)
    index = rows_mod.load_index(cfg.data.features, (tiny_model.vision.name, tiny_model.audio.name), None, rows_mod._storage(cfg))
    rows = rows_mod.train_rows(cfg).to_pylist()[:40]
    batch = model_inputs(next(pack_stream(rows_mod.samples(tiny_model, cfg, rows, index), 512, 2,
                                          tiny_model.tokenizer.pad_token_id)))
    with torch.no_grad():
        ours = tiny_model(**batch).loss
        embeds = tiny_model.embed(batch["input_ids"], batch["image_features"], batch["audio_features"], batch["position_ids"])
        positions = tiny_model.lm_positions(batch["input_ids"], batch["position_ids"])
        hf = tiny_model.llm(inputs_embeds=embeds, position_ids=positions, labels=batch["labels"]).loss
    assert torch.allclose(ours, hf, rtol=1e-5), (ours, hf)


def test_stage2_replays_stage1_pairs_among_its_dialogues(stage1, work):
    """``data.replay`` mixes stage 1's pairs into stage 2's rows, spread over the epoch, with their
    media in the workers' feature index."""
    from dataclasses import replace

    cfg, _, _ = stages.parse_args("finetune", [*_args(work, "finetune", 1, 1), f"model.init={stage1.final}",
                                               "data.replay=0.25"], "")
    cfg = stages.absolute_paths(cfg)
    dialogues = rows_mod.train_rows(replace(cfg, data=replace(cfg.data, replay=0.0)))
    mixed = rows_mod.train_rows(cfg).to_pylist()
    replayed = [i for i, r in enumerate(mixed) if r["dialogue_id"].startswith("caption-")]
    assert len(replayed) == round(0.25 * dialogues.num_rows) and len(mixed) == dialogues.num_rows + len(replayed)
    assert replayed[0] < len(mixed) // 4 and replayed[-1] > 3 * len(mixed) // 4, "replayed pairs are spread out"
    assert {m for i in replayed for m in mixed[i]["media_ids"]} <= rows_mod.train_media_ids(cfg)
    with pytest.raises(ValueError, match="has no caption or transcript, and data.replay=0.25 replays them"):
        empty = work / "no_captions.parquet"
        pq.write_table(pq.read_table(cfg.data.media).slice(0, 0), empty)
        rows_mod.train_rows(replace(cfg, data=replace(cfg.data, media=str(empty))))
    with pytest.raises(ValueError, match="has no caption or transcript, and stage 1 trains on them"):
        rows_mod.train_rows(replace(cfg, stage="pretrain", llm="frozen", data=replace(cfg.data, media=str(empty))))


def test_training_rows_are_shuffled_over_the_whole_split_whatever_order_the_files_hold(stage1, work):
    """Image dialogues in one file and audio ones in the next, as sorted user data or one import
    beside the synthesized files arrive: the rows a step takes from the front are of both, in one
    order per seed. Stage 1 shuffles items, each with its captions in both languages."""
    from dataclasses import replace

    root = work / "data_sorted"
    if not root.exists():
        (root / "dialogues").mkdir(parents=True)
        for name in ("features", "media.parquet"):
            (root / name).symlink_to(work / "data" / name)
        table = pq.read_table(work / "data" / "dialogues")
        images = pc.is_in(table["kind"], pa.array(IMAGE_KINDS))
        pq.write_table(table.filter(images), root / "dialogues" / "part-0.parquet")
        pq.write_table(table.filter(pc.invert(images)), root / "dialogues" / "part-1.parquet")
    cfg, _, _ = stages.parse_args("finetune", [*_args(work, "finetune", 1, 1, data=root), f"model.init={stage1.final}"], "")
    cfg = stages.absolute_paths(cfg)
    rows = rows_mod.train_rows(cfg)
    split = rows_mod.read_dialogues(cfg, "train")
    assert sorted(rows["dialogue_id"].to_pylist()) == sorted(split["dialogue_id"].to_pylist())
    front = rows["kind"].to_pylist()[: rows.num_rows // 4]
    share = sum(k in IMAGE_KINDS for k in front) / len(front)
    overall = sum(k in IMAGE_KINDS for k in rows["kind"].to_pylist()) / rows.num_rows
    assert abs(share - overall) < 0.2, f"the first quarter holds {share:.0%} image dialogues, the split {overall:.0%}"
    assert rows_mod.train_rows(cfg).equals(rows), "one seed, one order"
    reseeded = rows_mod.train_rows(replace(cfg, train=replace(cfg.train, seed=1)))
    assert reseeded["dialogue_id"].to_pylist() != rows["dialogue_id"].to_pylist()
    pretrain, _, _ = stages.parse_args("pretrain", _args(work, "pretrain", 1, 1, data=root), "")
    pretrain = stages.absolute_paths(pretrain)
    items = [ids[0] for ids in rows_mod.train_rows(pretrain)["media_ids"].to_pylist()]
    runs = [item for item, _ in itertools.groupby(items)]
    assert len(runs) == len(set(items)), "stage 1 keeps an item's captions in each language side by side"
    as_stored = dict.fromkeys(r["media_ids"][0] for r in rows_mod.caption_rows(rows_mod.read_media(pretrain)))
    assert runs != list(as_stored), "and shuffles the items"


def test_stage1_pins_local_checkpoints_as_absolute_paths_for_the_workers(tmp_path, monkeypatch):
    """Workers run elsewhere: a relative ``pretrained`` folder becomes absolute; a hub name stays."""
    from training.config import load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt" / "lm").mkdir(parents=True)
    cfg = load_config("pretrain", overrides=["model.preset=small-real",
                                            "model.overrides={llm: {pretrained: ckpt/lm}, audio: {pretrained: org/whisper}}"])
    pinned = stages.absolute_paths(cfg).model.overrides
    assert pinned == {"llm": {"pretrained": str(tmp_path / "ckpt" / "lm")}, "audio": {"pretrained": "org/whisper"}}


def test_normalize_and_config_layers(tmp_path):
    assert evaluate_job.normalize("  Image 2. ") == evaluate_job.normalize("image 2") == "image 2"
    assert evaluate_job.normalize("Ya!") == "ya"
    yaml_file = tmp_path / "s2.yaml"
    yaml_file.write_text("train:\n  lr: 1e-4\n  max_steps: 50\nmodel:\n  overrides: {llm: {num_layers: 3}}\n")
    cfg, init = stages.job_config("pretrain", "/d", str(yaml_file), ["train.max_steps=7"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.context_length) == (1e-4, 7, 512)  # preset < YAML < CLI
    assert cfg.train.micro_batch_size == job_defaults("tiny").pretrain.train.micro_batch_size and init is None
    assert cfg.model.overrides == {"llm": {"num_layers": 3}} and cfg.data.features == "/d/features"
    assert stages.model_config(cfg).llm.num_layers == 3, "stage 1 honours model.overrides"
    assert cfg.run.output_dir == "outputs/demo/stage1"


def test_small_real_stage2_replays_by_default_and_the_command_line_wins():
    from training.config import Sources, load_sources

    base = stages.job_base("finetune", "/d")
    assert load_sources("finetune", Sources.read(), "small-real", base).data.replay == 0.5
    assert load_sources("finetune", Sources.read(), "tiny", base).data.replay == 0.0
    off = load_sources("finetune", Sources.read(None, ["data.replay=0"]), "small-real", base)
    assert off.data.replay == 0.0 and off.data.media == "/d/media.parquet"


def test_stage2_takes_its_preset_from_the_checkpoint_and_refuses_architecture_overrides(stage1, work, tmp_path):
    cfg, init = stages.job_config("finetune", "/d", None, [f"model.init={stage1.final}", "lora.r=4", "llm=lora"])
    assert (init.phase, init.preset, cfg.model.preset) == ("stage1", "tiny", "tiny")
    assert cfg.train.max_steps == job_defaults("tiny").finetune.train.max_steps and cfg.lora.r == 4
    with pytest.raises(ValueError, match=r"model.overrides \['llm'\] cannot change a stage-2 model"):
        stages.job_config("finetune", "/d", None, [f"model.init={stage1.final}", "model.overrides={llm: {num_layers: 3}}"])
    with pytest.raises(ValueError, match="unknown config key 'lora.rank'"):
        stages.job_config("finetune", "/d", None, [f"model.init={stage1.final}", "lora.rank=4"])
