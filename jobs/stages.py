"""What stage 1 (``jobs/pretrain.py``) and stage 2 (``jobs/finetune.py``) plug into the shared loop.

Both stages run :func:`jobs.train_loop.fit` with the same row join (:mod:`jobs.rows`) and differ
only in how a worker builds its model and in the phase the export records:

* stage 1 builds the preset fresh, computes the FeatureNorm statistics (per position and channel)
  from the training features and stores them in the projectors' buffers, then trains the
  projectors only (``set_trainable(projectors=True, llm=False)``);
* stage 2 loads stage 1's export (refusing any other phase), keeping its projectors and their
  statistics, and trains projectors + LM (``llm=full``) or projectors + LoRA (``llm=lora``).

The final model is written by rank 0 in Hugging Face layout (``MMMModel.save_pretrained``) to
``<run.output_dir>/final`` next to ``metrics.jsonl``; that folder is what stage 2 starts from
and what serve loads (the demo: ``outputs/demo/stage1/final``, ``outputs/demo/stage2/final``).

Job defaults, layered as ``stage_defaults`` < these < ``--config`` YAML < ``key=value``: data
from ``--data ROOT`` (default ``outputs/data``, what jobs/synthesize.py + jobs/features.py
write), outputs under ``outputs/demo/stage{1,2}``, and for the tiny preset the step budget and
batch shape tuned for a 2-core CPU box (see ``TINY`` and the README's learning figures).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import time
from typing import Any

import yaml

from jobs import rows
from jobs.train_config import TrainConfig, add_config_args, load_config
from jobs.train_loop import TrainHooks, fit

PHASE = {"pretrain": "stage1", "finetune": "stage2"}
FINAL = "final"
"""Folder under run.output_dir holding the exported model."""
OUTPUT = {"pretrain": "outputs/demo/stage1", "finetune": "outputs/demo/stage2"}

# The tiny preset on 2 CPU cores (measured on a quiet 2-core machine, see the README):
# * packed rows of 512 tokens hold ~5 dialogues; 2 workers x 4 rows = ~40 dialogues per optimizer
#   step. Both workers run one thread each (Ray's OMP_NUM_THREADS=1): faster than one worker with
#   two threads, and no OpenMP barrier stalls when another process takes a core;
# * ~3.6 optimizer steps/s end to end under Ray + ZeRO-2 with the 3-layer LM and packed attention
#   (mmm/attention.py); 4.4-4.9 with 2 layers;
# * stage 1 is short: with a frozen random LM the projectors barely move the caption loss, so the
#   budget goes to stage 2 (projectors + LM). 1800 steps took 7.7 minutes one day and 8.6-8.8 on
#   another (same machine type, quiet), so 1600 keep stage 1 + stage 2 under the 10-minute budget with
#   room. The recall drills (pipelines/synth/offline.py) need the steps: questions about an earlier
#   item were learned between steps 600 and 1200 in the calibration (README, "Learning").
TINY: dict[str, list[str]] = {
    "pretrain": ["train.max_steps=60", "train.lr=2e-3", "train.warmup_steps=10", "train.checkpoint_every=30"],
    "finetune": ["train.max_steps=1600", "train.lr=2e-3", "train.warmup_steps=30", "train.checkpoint_every=400"],
}
TINY_COMMON = ["train.context_length=512", "train.micro_batch_size=4", "train.grad_accum=1", "train.schedule=cosine",
               "train.min_lr_ratio=0.1", "train.log_every=10", "resources.num_workers=2", "resources.cpus_per_worker=1"]


# ---- configuration ------------------------------------------------------------------------------


def job_defaults(stage: str, data: str) -> list[str]:
    out = [f"data.dialogues={data}/dialogues", f"data.features={data}/features", f"data.media={data}/media.parquet",
           f"run.output_dir={OUTPUT[stage]}"]
    if stage == "finetune":
        out.append(f"model.init={OUTPUT['pretrain']}/{FINAL}")
    return out


def _flatten(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """A YAML mapping -> ``key=value`` overrides (values re-serialised as YAML flow scalars)."""
    out = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and dotted != "model.overrides":
            out += _flatten(value, dotted + ".")
        else:
            out.append(f"{dotted}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    return out


def job_config(stage: str, data: str, config_path: str | None, overrides: list[str]) -> TrainConfig:
    """stage_defaults < job defaults (+ TINY for the tiny preset) < YAML < command-line overrides."""
    user = []
    if config_path:
        with open(config_path) as f:
            user = _flatten(yaml.safe_load(f) or {})
    user += overrides
    base = job_defaults(stage, data)
    cfg = load_config(stage, None, [*base, *user])
    preset = (_init_preset(cfg) if stage == "finetune" else None) or cfg.model.preset
    if preset == "tiny":
        cfg = load_config(stage, None, [*base, *TINY_COMMON, *TINY[stage], *user])
    return cfg


def _init_preset(cfg: TrainConfig) -> str | None:
    try:
        return read_phase(cfg)[1]
    except (OSError, ValueError):
        return None


def parse_args(stage: str, argv: list[str] | None, doc: str) -> tuple[TrainConfig, bool]:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="outputs/data", help="data root written by jobs/synthesize.py + jobs/features.py")
    add_config_args(parser)
    args = parser.parse_args(argv)
    return job_config(stage, args.data, args.config, [*args.overrides, *args.extra]), args.resume


def main(stage: str, argv: list[str] | None, doc: str) -> dict:
    """A stage job's whole command line: parse, run, print the summary as one JSON line."""
    cfg, resume = parse_args(stage, argv, doc)
    out = run(cfg, resume)
    print(json.dumps(out))
    return out


# ---- checkpoints ---------------------------------------------------------------------------------


def read_phase(cfg: TrainConfig) -> tuple[str, str]:
    """(phase, preset) recorded in ``model.init``'s mmm.json (local or s3://), without loading it."""
    from jobs.storage import resolve
    from mmm.checkpoint import META

    fs, path = resolve(cfg.model.init, cfg.run.s3_endpoint)
    try:
        with fs.open_input_stream(f"{path}/{META}") as f:
            meta = json.loads(f.read())
    except (FileNotFoundError, OSError) as e:
        raise FileNotFoundError(f"model.init {cfg.model.init} is not an MMM checkpoint (no {META}): {e}") from None
    return meta.get("phase"), meta.get("config", {}).get("preset")


def check_init(cfg: TrainConfig) -> None:
    """Stage 2 starts from stage 1's export and nothing else: fail before any worker starts."""
    from mmm.checkpoint import CheckpointError

    if cfg.stage != "finetune":
        return
    if not cfg.model.init:
        raise CheckpointError("stage 2 (finetune) starts from a stage-1 checkpoint: set model.init=<stage1 output>/final")
    phase, _ = read_phase(cfg)
    if phase != "stage1":
        raise CheckpointError(
            f"model.init {cfg.model.init} is a {phase!r} checkpoint, but stage 2 (finetune) must start from a 'stage1' "
            f"checkpoint (jobs/pretrain.py's {FINAL}/): its projectors and feature statistics are what stage 2 builds on")


# ---- hooks (module-level: workers import them by reference) ---------------------------------------


def model_config(cfg: TrainConfig):
    from mmm.config import ModelConfig, preset

    base = preset(cfg.model.preset).to_dict()
    return ModelConfig.from_dict(_merge(base, copy.deepcopy(cfg.model.overrides)))


def _merge(base: dict, top: dict) -> dict:
    for k, v in top.items():
        base[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def build_model(cfg: TrainConfig):
    """In each worker: stage 1 builds the preset and sets feature statistics; stage 2 loads stage 1.
    Returned inside :class:`~jobs.answer_loss.AnswerLoss` (the LM head only on labelled tokens)."""
    import torch

    from jobs.answer_loss import AnswerLoss
    from mmm.model import MMMModel

    torch.set_num_threads(max(1, int(cfg.resources.cpus_per_worker)))
    if cfg.stage == "pretrain":
        model = MMMModel.build(model_config(cfg))
        rows.set_feature_stats(model, rows.worker_index(model, cfg))
        model.set_trainable(projectors=True, llm=False)
    else:
        model = MMMModel.from_pretrained(cfg.model.init, expect_phase="stage1")
        model.set_trainable(projectors=True, llm="lora" if cfg.llm == "lora" else True)
    return AnswerLoss(model).train()


def export(model, path: str, cfg: TrainConfig) -> None:
    """Rank 0: the final model in HF layout, into ``<output_dir>/final`` (the loop offers ``.../model``)."""
    from jobs.answer_loss import unwrap

    final = os.path.join(os.path.dirname(path), FINAL)
    unwrap(model).eval().save_pretrained(final, phase=PHASE[cfg.stage])
    with open(os.path.join(final, "train_config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=1)


def hooks() -> TrainHooks:
    from mmm.packing import model_inputs

    return TrainHooks(build_model=build_model, make_batches=rows.packed_batches, export=export, model_inputs=model_inputs)


# ---- the job ---------------------------------------------------------------------------------------


def run(cfg: TrainConfig, resume: bool = False, train_hooks: TrainHooks | None = None) -> dict:
    """setup (Ray, rows) -> fit -> summary. Joins RAY_ADDRESS when set, else starts a local Ray."""
    from pipelines.runtime import RayConfig, init_ray

    cfg = absolute_paths(cfg)
    check_init(cfg)
    started = init_ray(RayConfig(progress=False))
    t0 = time.time()
    try:
        result = fit(cfg, train_hooks or hooks(), {"train": rows.train_dataset(cfg)}, resume=resume)
    finally:
        if started:
            import ray

            ray.shutdown()
    return summary(cfg, result, time.time() - t0)


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local data and init paths made absolute: Ray workers run in another directory."""
    from jobs.storage import is_remote

    fix = lambda p: p if not p or is_remote(p) else os.path.abspath(p)  # noqa: E731
    data = dataclasses.replace(cfg.data, dialogues=fix(cfg.data.dialogues), features=fix(cfg.data.features),
                               media=cfg.data.media and fix(cfg.data.media))
    model = dataclasses.replace(cfg.model, init=cfg.model.init and fix(cfg.model.init))
    return dataclasses.replace(cfg, data=data, model=model)


def summary(cfg: TrainConfig, result, seconds: float) -> dict:
    from jobs.metrics import read_jsonl

    out = {"stage": cfg.stage, "steps": result.metrics.get("step"), "loss": result.metrics.get("loss"),
           "final": f"{cfg.run.output_dir}/{FINAL}", "fit_seconds": round(seconds, 1)}
    path = os.path.join(cfg.run.output_dir, "metrics.jsonl")
    if os.path.exists(path):
        out.update(training_time(read_jsonl(path)))
    return out


def training_time(records: list[dict]) -> dict:
    """Seconds spent in optimizer steps (first start event to the last metric line, restarts included)."""
    starts = [r for r in records if r.get("event") == "start"]
    steps = [r for r in records if "step" in r and "loss" in r]
    if not starts or not steps:
        return {}
    first = steps[0]
    return {"train_seconds": round(steps[-1]["time"] - starts[0]["time"], 1), "first_loss": first["loss"],
            "setup_seconds": starts[0].get("setup_s")}
