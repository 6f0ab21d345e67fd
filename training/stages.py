"""What stage 1 (``jobs/pretrain.py``) and stage 2 (``jobs/finetune.py``) plug into the shared loop.

Both stages run :func:`training.loop.fit` with the same row join (:mod:`training.rows`) and differ
only in how a worker builds its model and in the phase the export records:

* stage 1 builds the preset fresh, computes the FeatureNorm statistics (per position and channel)
  from the training features and stores them in the projectors' buffers, then trains the
  projectors only (``set_trainable(projectors=True, llm=False)``);
* stage 2 loads stage 1's export (refusing any other phase), keeping its projectors and their
  statistics, and trains projectors + LM (``llm=full``) or projectors + LoRA (``llm=lora``).

The final model is written by rank 0 in Hugging Face layout (``MMMModel.save_pretrained``) to
``<run.output_dir>/final`` next to ``metrics.jsonl``; that folder is what stage 2 starts from
and what serve loads (the demo: ``outputs/demo/stage1/final``, ``outputs/demo/stage2/final``).

A job's config is layered once: the preset's training defaults (training/presets.py) < the
jobs' own (data from ``--data ROOT``, default ``outputs/data``, what jobs/synthesize.py +
jobs/features.py write; outputs under ``outputs/demo/stage{1,2}``) < ``--config`` YAML <
``key=value``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from mmm import config_io
from mmm.checkpoint import META, CheckpointError
from training import rows
from training.config import Sources, TrainConfig, add_config_args, load_sources
from training.loop import TrainHooks, fit

PHASE = {"pretrain": "stage1", "finetune": "stage2"}
FINAL = "final"
"""Folder under run.output_dir holding the exported model."""
OUTPUT = {"pretrain": "outputs/demo/stage1", "finetune": "outputs/demo/stage2"}


# ---- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class InitCheckpoint:
    """What ``model.init``'s mmm.json says, read once per run (local or s3://)."""

    path: str
    phase: str
    preset: str
    max_context: int | None = None
    """The longest sequence the checkpoint's model accepts (its llm.max_context)."""

    @classmethod
    def read(cls, path: str, s3_endpoint: str | None = None) -> "InitCheckpoint":
        from training.storage import resolve

        fs, local = resolve(path, s3_endpoint)
        try:
            with fs.open_input_stream(f"{local}/{META}") as f:
                meta = json.loads(f.read())
        except (FileNotFoundError, OSError) as e:
            raise FileNotFoundError(f"model.init {path} is not an MMM checkpoint (no {META}): {e}") from None
        config = meta.get("config", {})
        return cls(path, meta.get("phase"), config.get("preset"), config.get("llm", {}).get("max_context"))

    def check_stage2(self) -> None:
        """Stage 2 starts from stage 1's export and nothing else: fail before any worker starts."""
        if self.phase != "stage1":
            raise CheckpointError(
                f"model.init {self.path} is a {self.phase!r} checkpoint, but stage 2 (finetune) must start from a "
                f"'stage1' checkpoint (jobs/pretrain.py's {FINAL}/): its projectors and feature statistics are what "
                "stage 2 builds on")


def job_base(stage: str, data: str) -> dict[str, Any]:
    """The jobs' own defaults over the preset's: data from ``--data ROOT`` (what jobs/synthesize.py +
    jobs/features.py write), outputs under outputs/demo/stage{1,2}, stage 2 from stage 1's export."""
    base: dict[str, Any] = {
        "data": {"dialogues": f"{data}/dialogues", "features": f"{data}/features", "media": f"{data}/media.parquet"},
        "run": {"output_dir": OUTPUT[stage]},
    }
    if stage == "finetune":
        base["model"] = {"init": f"{OUTPUT['pretrain']}/{FINAL}"}
    return base


def job_config(stage: str, data: str, config_path: str | None, overrides: list[str]) -> tuple[TrainConfig, InitCheckpoint | None]:
    """The preset's defaults < job defaults < YAML < command-line overrides, each read once. Stage 2's
    preset is its ``model.init`` checkpoint's, so that checkpoint's metadata is read here (once)."""
    sources = Sources.read(config_path, overrides)
    base = job_base(stage, data)
    init = None
    if stage == "finetune":
        path = sources.lookup("model.init") or base["model"]["init"]
        init = InitCheckpoint.read(path, sources.lookup("run.s3_endpoint"))
    preset = init.preset if init else None
    return load_sources(stage, sources, preset, base), init


def fields_help(stage: str) -> str:
    """Every TrainConfig key with its default for ``stage`` (the tiny preset's, ``--data`` left as it
    is) and its docstring."""
    from pipelines.cli import describe

    defaults = load_sources(stage, Sources.read(None, []), "tiny", job_base(stage, "outputs/data"))
    return ("config fields (key = default with the tiny preset; other presets' training defaults are in "
            "training/presets.py):\n" + "\n".join(describe(TrainConfig, defaults.to_dict())))


def parse_args(stage: str, argv: list[str] | None, doc: str) -> tuple[TrainConfig, bool, InitCheckpoint | None]:
    """The command line as a typed config; a config problem (a bad key or value, a missing or invalid
    ``--config`` file, a ``model.init`` that is no checkpoint) exits 2 with one usage line naming it."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=fields_help(stage))
    parser.add_argument("--data", default="outputs/data", help="data root written by jobs/synthesize.py + jobs/features.py")
    add_config_args(parser)
    args = parser.parse_args(argv)
    try:
        cfg, init = job_config(stage, args.data, args.config, [*args.overrides, *args.extra])
    except (ValueError, TypeError, FileNotFoundError) as e:  # FileNotFoundError: a model.init that is no checkpoint
        parser.error(str(e))
    return cfg, args.resume, init


def main(stage: str, argv: list[str] | None, doc: str) -> dict:
    """A stage job's whole command line: parse, run, print the summary as one JSON line."""
    cfg, resume, init = parse_args(stage, argv, doc)
    out = run(cfg, resume, init=init)
    print(json.dumps(out))
    return out


# ---- hooks (module-level: workers import them by reference) ---------------------------------------


def model_config(cfg: TrainConfig):
    """Stage 1's model: the preset with ``model.overrides`` (checked field by field)."""
    from mmm.config import ModelConfig, preset

    return ModelConfig.from_dict(config_io.merge(preset(cfg.model.preset).to_dict(), cfg.model.overrides))


def build_model(cfg: TrainConfig):
    """In each worker: stage 1 builds the preset and sets feature statistics; stage 2 loads stage 1
    and trains the LM in full or through LoRA adapters."""
    import torch

    from mmm.model import MMMModel

    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    if cfg.stage == "pretrain":
        model = MMMModel.build(model_config(cfg))
        rows.set_feature_stats(model, rows.worker_index(model, cfg))
        model.set_trainable(projectors=True, llm=False)
    else:
        model = MMMModel.from_pretrained(cfg.model.init, expect_phase="stage1", storage_options=_storage_options(cfg))
        model.set_trainable(projectors=True, llm=llm_trains(cfg))
    if cfg.train.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def llm_trains(cfg: TrainConfig):
    """What ``set_trainable`` gets for the LM: the LoRA settings, True (full) or False (frozen)."""
    return cfg.lora if cfg.llm == "lora" else cfg.llm == "full"


def _storage_options(cfg: TrainConfig) -> dict | None:
    """fsspec options of ``model.init`` when it lives on an S3-compatible store at ``run.s3_endpoint``."""
    return {"client_kwargs": {"endpoint_url": cfg.run.s3_endpoint}} if cfg.run.s3_endpoint else None


def export(model, path: str, cfg: TrainConfig) -> None:
    """Rank 0: the final model in HF layout, into ``<output_dir>/final`` (the loop offers ``.../model``)."""
    final = os.path.join(os.path.dirname(path), FINAL)
    if not cfg.resources.use_gpu:
        # a CPU run's checkpoint is read by CPU evaluation, stage 2 and serving, which compute in
        # fp32: the bf16 copy DeepSpeed trained goes back to fp32 (GPU runs keep bf16: half the bytes)
        model.float()
    model.merge_lora()  # training is over: the adapters go into the LM's own weights, not into a copy
    model.eval().save_pretrained(final, phase=PHASE[cfg.stage])
    with open(os.path.join(final, "train_config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=1)


def hooks() -> TrainHooks:
    from mmm.model import labelled_tokens
    from mmm.packing import model_inputs

    return TrainHooks(build_model=build_model, make_batches=rows.packed_batches, export=export, model_inputs=model_inputs,
                      count_targets=labelled_tokens)


# ---- the job ---------------------------------------------------------------------------------------


def run(cfg: TrainConfig, resume: bool = False, train_hooks: TrainHooks | None = None,
        init: InitCheckpoint | None = None) -> dict:
    """setup (Ray, rows) -> fit -> summary. Joins RAY_ADDRESS when set, else starts a local Ray.
    ``init``: stage 2's checkpoint metadata when the caller has read it already."""
    from pipelines.runtime import RayConfig, init_ray

    cfg = absolute_paths(cfg)
    if cfg.stage == "finetune":
        if not cfg.model.init:
            raise CheckpointError("stage 2 (finetune) starts from a stage-1 checkpoint: set model.init=<stage1 output>/final")
        init = init or InitCheckpoint.read(cfg.model.init, cfg.run.s3_endpoint)
        init.check_stage2()
    check_context(cfg, init.max_context if init else model_config(cfg).llm.max_context)
    rows.check_features(cfg)
    started = init_ray(RayConfig(progress=False))
    t0 = time.time()
    try:
        result = fit(cfg, train_hooks or hooks(), {"train": rows.train_dataset(cfg)}, resume=resume)
    finally:
        if started:
            import ray

            ray.shutdown()
    return summary(cfg, result, time.time() - t0)


def check_context(cfg: TrainConfig, max_context: int | None) -> None:
    """Packed rows longer than the model accepts are refused before any worker starts."""
    if max_context is not None and cfg.train.context_length > max_context:
        raise ValueError(f"train.context_length {cfg.train.context_length} exceeds the model's llm.max_context "
                         f"{max_context} (bounded by its LM's positions): lower train.context_length")


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local data, init and checkpoint paths made absolute: Ray workers run in another directory
    (and maybe as another user, whose cache or MMM_WEIGHTS_DIR would name other weights)."""
    from training.storage import is_remote

    fix = lambda p: p if not p or is_remote(p) else os.path.abspath(p)  # noqa: E731
    data = dataclasses.replace(cfg.data, dialogues=fix(cfg.data.dialogues), features=fix(cfg.data.features),
                               media=cfg.data.media and fix(cfg.data.media))
    model = dataclasses.replace(cfg.model, init=cfg.model.init and fix(cfg.model.init),
                                overrides=_pinned_checkpoints(cfg) if cfg.stage == "pretrain" else cfg.model.overrides)
    return dataclasses.replace(cfg, data=data, model=model)


def _pinned_checkpoints(cfg: TrainConfig) -> dict:
    """Stage 1's overrides with every part's ``pretrained`` that is a local folder here (given
    relative, or the preset's path under this user's weights cache) as an absolute path; hub names
    stay as they are."""
    resolved = model_config(cfg)
    pinned = {part: {"pretrained": os.path.abspath(path)} for part in ("vision", "audio", "llm")
              if (path := getattr(resolved, part).pretrained) and os.path.isdir(path)}
    return config_io.merge(cfg.model.overrides, pinned)


def summary(cfg: TrainConfig, result, seconds: float) -> dict:
    from training.metrics import read_jsonl

    out = {"stage": cfg.stage, "steps": result.metrics.get("step"), "loss": result.metrics.get("loss"),
           "final": f"{cfg.run.output_dir}/{FINAL}", "fit_seconds": round(seconds, 1)}
    path = os.path.join(cfg.run.output_dir, "metrics.jsonl")
    if os.path.exists(path):
        out.update(training_time(read_jsonl(path)))
    return out


def training_time(records: list[dict]) -> dict:
    """Seconds spent in optimizer steps (first start event to the last metric line, restarts included),
    and the rows skipped as longer than the context (each time an epoch met them)."""
    starts = [r for r in records if r.get("event") == "start"]
    steps = [r for r in records if "step" in r and "loss" in r]
    if not starts or not steps:
        return {}
    first = steps[0]
    return {"train_seconds": round(steps[-1]["time"] - starts[0]["time"], 1), "first_loss": first["loss"],
            "setup_seconds": starts[0].get("setup_s"), "skipped_rows": sum(r.get("skipped_rows", 0) for r in steps)}
