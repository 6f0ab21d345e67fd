"""Typed configuration of the training jobs (stage 1 ``pretrain``, stage 2 ``finetune``).

One dataclass per concern, composed into :class:`TrainConfig`. A job builds it in three layers,
later ones winning: the stage's defaults (:func:`stage_defaults`), a YAML file, then ``key=value``
overrides from the command line::

    python jobs/finetune.py --config my.yaml --set train.lr=1e-4 train.max_steps=200
    python jobs/finetune.py run.name=exp1 --resume

Loading (key checks, YAML values coerced to field types) is :mod:`mmm.config_io`, shared with the
pipeline jobs.

Batch arithmetic: one optimizer step sees ``micro_batch_size * grad_accum * num_workers`` packed
rows of ``context_length`` tokens (DeepSpeed's ``train_batch_size``).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable

from mmm import config_io
from mmm.lora import LoraSettings
from mmm.precision import check_bf16

STAGES = ("pretrain", "finetune")
LLM_MODES = ("frozen", "full", "lora")
SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class ModelSection:
    preset: str = "tiny"
    """Model preset (a name in mmm.config.PRESETS): what stage 1 builds, and whose training defaults
    (training/presets.py) a job starts from. Stage 2 takes it from ``init``'s checkpoint."""
    init: str | None = None
    """Checkpoint to start from (local or s3://): stage 2 starts from stage 1's export. None builds
    the preset fresh (stage 1 only)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields over the preset, nested (``{"llm": {"pretrained": "/ckpt/lm"}}``), checked
    against ModelConfig's fields. Stage 1 only: stage 2's architecture is its checkpoint's, so there
    any override is refused by name."""

    def __post_init__(self) -> None:
        from mmm.config import PRESETS

        _check(self.preset in PRESETS, f"model.preset must be one of {sorted(PRESETS)}, got {self.preset!r}")


@dataclass
class DataSection:
    dialogues: str = ""
    """Dialogue Parquet (stage 2) or caption/transcript pairs (stage 1); a local path or s3://."""
    features: str = ""
    """Encoder-feature Parquet that dialogues are joined with."""
    media: str | None = None
    """Media Parquet; only needed when a job reads captions/transcripts from it."""
    split: str = "train"
    """Rows of this split are trained on; the eval split is held out for jobs/evaluate.py."""
    shuffle_buffer: int = 256
    """Rows in each worker's local shuffle buffer; cheap, and reshuffled every epoch with a new seed."""
    preserve_order: bool = True
    """Ray Data hands the workers their blocks in a fixed order, so a rerun with the same seed and
    worker count trains on the same rows in the same order and ends with the same model. False lets
    blocks go to whichever worker asks first: ingest never waits on a slow block, at the price of a
    run that cannot be repeated."""
    replay: float = 0.0
    """Stage 2: stage 1's caption/transcript pairs mixed into the training rows, as a fraction of the
    dialogues (0.5: one pair for every two dialogues; needs ``data.media``). Rehearsal: what only
    stage 1 teaches (transcription, "no speech") is otherwise unlearned in stage 2."""


@dataclass
class OptimSection:
    """Steps, batch and optimizer. Defaults are the paper's stage 2 (constant lr 2e-5, batch 12, 8192)."""

    max_steps: int = 1000
    """Optimizer steps (not micro-batches); the data loops over epochs until this many are done."""
    micro_batch_size: int = 1
    """Packed rows per worker per forward pass."""
    grad_accum: int = 6
    """Micro-batches per optimizer step; 1 x 6 x 2 workers = the paper's batch of 12."""
    context_length: int = 8192
    """Tokens per packed row (the paper's stage 2 context)."""
    lr: float = 2e-5
    schedule: str = "constant"
    """constant | cosine | linear (decay after warmup). The paper's stage 2 is constant."""
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    """Floor of the cosine/linear decay as a fraction of ``lr``."""
    weight_decay: float = 0.0
    """Applied to matrices only (not biases, norms or embeddings' 1-d params)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Global gradient-norm clip (DeepSpeed ``gradient_clipping``); 0 disables it."""
    seed: int = 0
    """Seeds model init (same on every rank) and data shuffling (different per rank and epoch)."""
    log_every: int = 10
    """Optimizer steps between metric lines (loss, lr, tokens/s) from rank 0."""
    checkpoint_every: int = 500
    """Optimizer steps between checkpoints; the last step is always checkpointed."""
    gradient_checkpointing: bool = False
    """Recompute each LM layer's activations in the backward pass instead of keeping them: ~1/3 more
    compute for a fraction of the activation memory (``python jobs/plan.py --gradient-checkpointing``
    shows what it saves per GPU; Mistral-7B at 8192 tokens needs it on 80 GB cards)."""


@dataclass
class DeepSpeedSection:
    zero_stage: int = 2
    """ZeRO-2 partitions gradients and optimizer state; parameters stay whole on every rank, so rank 0
    can export the model without a gather."""
    offload_optimizer: bool = False
    """Optimizer state and step on CPU (DeepSpeedCPUAdam, a JIT-built op: 40-110 s once, then cached
    in TORCH_EXTENSIONS_DIR). Saves GPU memory for 7B models; pointless on CPU-only workers."""
    bf16: str | bool = "auto"
    """auto: bf16 where the worker's device computes it natively (a GPU with bf16, a CPU with bf16
    instructions), fp32 elsewhere (mmm/precision.py)."""


@dataclass
class ResourcesSection:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    """Ray CPUs per worker; on a 2-core box leave room for Ray Data, whose write tasks never run when the actors hold every CPU."""


@dataclass
class RunSection:
    name: str | None = None
    """Ray Train run name; the same name + storage_path resumes. None: ``{stage}-{timestamp}``."""
    storage_path: str = "outputs/ray_results"
    """Where Ray Train keeps checkpoints: a local folder (made absolute) or s3://bucket/prefix."""
    output_dir: str = "outputs/train"
    """Where rank 0 exports the final model (Hugging Face layout) and metrics.jsonl; local or s3://."""
    s3_endpoint: str | None = None
    """Endpoint of an S3-compatible store (tests: a local moto server); None uses AWS."""
    max_failures: int = 2
    """Worker-group restarts after a lost worker; each resumes from the latest checkpoint."""
    keep_checkpoints: int = 2
    """Checkpoints kept in storage (the newest)."""
    progress: bool = True
    """Progress bar from rank 0."""


@dataclass
class TrainConfig:
    stage: str = "finetune"
    """pretrain (stage 1: projectors on caption/transcript pairs) | finetune (stage 2: dialogues)."""
    llm: str = "full"
    """What of the LM trains: frozen (stage 1) | full | lora (settings in ``lora``). Projectors always train."""
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSettings = field(default_factory=LoraSettings)
    """Stage 2's adapters when ``llm: lora`` (mmm/lora.py); ignored otherwise."""
    data: DataSection = field(default_factory=DataSection)
    train: OptimSection = field(default_factory=OptimSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    resources: ResourcesSection = field(default_factory=ResourcesSection)
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self) -> None:
        _check(self.stage in STAGES, f"stage must be one of {STAGES}, got {self.stage!r}")
        _check(self.llm in LLM_MODES, f"llm must be one of {LLM_MODES}, got {self.llm!r}")
        _check(self.stage != "pretrain" or self.llm == "frozen", "stage 1 (pretrain) trains projectors only: llm must be 'frozen'")
        t = self.train
        _check(t.schedule in SCHEDULES, f"train.schedule must be one of {SCHEDULES}, got {t.schedule!r}")
        for name in ("max_steps", "micro_batch_size", "grad_accum", "context_length", "log_every", "checkpoint_every"):
            _check(getattr(t, name) >= 1, f"train.{name} must be >= 1, got {getattr(t, name)}")
        _check(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
        _check(len(t.betas) == 2, f"train.betas needs two values, got {t.betas}")
        _check(self.deepspeed.zero_stage in (0, 1, 2), f"deepspeed.zero_stage must be 0, 1 or 2, got {self.deepspeed.zero_stage}")
        check_bf16(self.deepspeed.bf16, "deepspeed.bf16")
        _check(self.resources.num_workers >= 1, "resources.num_workers must be >= 1")
        _check(self.stage != "finetune" or not self.model.overrides,
               f"model.overrides {sorted(self.model.overrides)} cannot change a stage-2 model: its architecture is "
               "model.init's checkpoint (set them in stage 1; LoRA settings are the lora section)")
        _check(self.lora.r >= 1 and self.lora.alpha >= 1, f"lora.r and lora.alpha must be >= 1, got {self.lora.r}, {self.lora.alpha}")

    @property
    def global_batch(self) -> int:
        """Packed rows per optimizer step over all workers (DeepSpeed's train_batch_size)."""
        return self.train.micro_batch_size * self.train.grad_accum * self.resources.num_workers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return config_io.load(cls, d)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def stage_defaults(stage: str, preset: str = "tiny") -> TrainConfig:
    """The typed defaults of one stage for one model preset (training/presets.py)."""
    from training.presets import job_defaults

    _check(stage in STAGES, f"stage must be one of {STAGES}, got {stage!r}")
    return job_defaults(preset).for_stage(stage)


# ---- loading: defaults <- YAML <- overrides, each read once -------------------------------------


@dataclass(frozen=True)
class Sources:
    """What the user gave, read once: the YAML mapping and the parsed ``key=value`` overrides."""

    tree: dict[str, Any]
    overrides: tuple[tuple[str, Any], ...]

    @classmethod
    def read(cls, path: str | None = None, overrides: Iterable[str] = ()) -> "Sources":
        tree = config_io.read_yaml(path) if path else {}
        return cls(tree, tuple(config_io.parse_override(o) for o in overrides))

    def lookup(self, dotted: str) -> Any:
        """The value the user set for ``dotted`` (an override wins over the YAML), else None."""
        for key, value in reversed(self.overrides):
            if key == dotted:
                return value
        node: Any = self.tree
        for name in dotted.split("."):
            node = node.get(name) if isinstance(node, dict) else None
        return node


def load_config(stage: str, path: str | None = None, overrides: Iterable[str] = (), preset: str | None = None,
                base: dict[str, Any] | None = None) -> TrainConfig:
    """``stage_defaults(stage, preset)`` <- ``base`` (a job's own defaults) <- YAML at ``path`` <-
    ``key=value`` overrides. The preset is ``preset``, else the one the user names, else tiny."""
    return load_sources(stage, Sources.read(path, overrides), preset, base)


def load_sources(stage: str, sources: Sources, preset: str | None = None, base: dict[str, Any] | None = None) -> TrainConfig:
    preset = preset or sources.lookup("model.preset") or "tiny"
    tree = config_io.merge(stage_defaults(stage, preset).to_dict(), base or {})
    tree = config_io.merge(tree, sources.tree)
    _check(tree.get("stage", stage) == stage, f"config says stage {tree.get('stage')!r} but this job is {stage!r}")
    return config_io.load_parsed(TrainConfig, tree, sources.overrides)


# ---- command line ---------------------------------------------------------------------------


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with TrainConfig sections (train:, data:, run:, ...)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="overrides such as train.lr=1e-4 run.name=exp1")
    parser.add_argument("--resume", action="store_true", help="continue run.name from its latest checkpoint")
    parser.add_argument("extra", nargs="*", metavar="KEY=VALUE", help="more overrides, without --set")


