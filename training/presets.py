"""Each model preset's training defaults, as typed values beside the preset.

A job's config is layered once: these defaults < the job's own (data root, output folders) <
``--config`` YAML < ``key=value`` (training/config.py). A preset names what its model needs to
learn on the hardware it is meant for; every figure behind a choice is in docs/LEARNING.md.

    job_defaults("tiny").finetune.train.max_steps   # 1600
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from training.config import DataSection, DeepSpeedSection, OptimSection, ResourcesSection, TrainConfig


@dataclass(frozen=True)
class StageDefaults:
    """The parts of a :class:`TrainConfig` a preset chooses for one stage."""

    train: OptimSection
    llm: str = "full"
    """What of the LM trains in this stage (stage 1 is always frozen)."""
    resources: ResourcesSection = field(default_factory=ResourcesSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    data: DataSection = field(default_factory=DataSection)
    """The data settings a preset chooses (``replay``); the data folders come from the job."""


@dataclass(frozen=True)
class PresetDefaults:
    pretrain: StageDefaults
    finetune: StageDefaults

    def for_stage(self, stage: str) -> TrainConfig:
        d: StageDefaults = getattr(self, stage)
        return TrainConfig(stage=stage, llm=d.llm, train=replace(d.train), resources=replace(d.resources),
                           deepspeed=replace(d.deepspeed), data=replace(d.data))


def _tiny() -> PresetDefaults:
    """2 CPU workers of one thread each (faster than one worker with two threads, and no OpenMP
    barrier stalls when another process takes a core). Rows of 512 tokens hold ~5 dialogues, so a
    step of 2 x 4 rows sees ~40. Stage 1 is short: with a frozen random LM the projectors barely
    move the caption loss, so the budget goes to stage 2, whose recall drills are learned between
    steps 600 and 1200; 1600 steps keep both stages under 10 minutes on 2 cores
    (docs/LEARNING.md, "Step budget"). Stage 2 at lr 1e-3: at 2e-3 or 3e-3 one seed in three
    stays on a plateau where yes/no verdicts are at chance (docs/LEARNING.md, "What the plateau
    is: verdicts"). fp32 even where the CPU has bf16: the recipe's figures are fp32's."""
    common = dict(context_length=512, micro_batch_size=4, grad_accum=1, schedule="cosine", min_lr_ratio=0.1, log_every=10)
    cpu = ResourcesSection(num_workers=2, use_gpu=False, cpus_per_worker=1.0)
    fp32 = DeepSpeedSection(bf16=False)
    return PresetDefaults(
        pretrain=StageDefaults(OptimSection(max_steps=60, lr=2e-3, warmup_steps=10, checkpoint_every=30, **common),
                               llm="frozen", resources=cpu, deepspeed=fp32),
        finetune=StageDefaults(OptimSection(max_steps=1600, lr=1e-3, warmup_steps=30, checkpoint_every=400, **common),
                               resources=cpu, deepspeed=fp32),
    )


def _small_real() -> PresetDefaults:
    """Real Whisper-base + SmolLM2-135M on 2 CPU workers. Stage 1 aligns the projectors on captions
    and transcripts with the LM frozen (most of what transcription needs is learned here); stage 2
    adds LoRA on the LM for the dialogues (docs/LEARNING.md, "small-real")."""
    common = dict(grad_accum=1, schedule="cosine", min_lr_ratio=0.05, log_every=10)
    cpu = ResourcesSection(num_workers=2, use_gpu=False, cpus_per_worker=1.0)
    return PresetDefaults(
        # rows of 256 tokens hold ~4 transcript pairs: 2 workers x 2 rows ~ 16 pairs a step, ~2.1 s a
        # step on 2 cores with bf16 instructions (3.2-6.8 s without: there 160 steps fit 20 minutes).
        # Transcription is learned here and grows with the pairs seen, so stage 1 takes most of the 20 minutes;
        # stage 2 is short and gentle: LoRA at lr 1e-3 or 3e-4 taught the dialogues but cost transcription
        # words; at 1e-4 for 20 steps (~1 minute) it keeps them, and it replays one stage-1 pair for every
        # two dialogues, which keeps the "no speech" answers (docs/LEARNING.md, "small-real")
        pretrain=StageDefaults(OptimSection(max_steps=480, lr=5e-3, warmup_steps=10, micro_batch_size=2,
                                            context_length=256, checkpoint_every=80, **common),
                               llm="frozen", resources=cpu),
        finetune=StageDefaults(OptimSection(max_steps=20, lr=1e-4, warmup_steps=3, micro_batch_size=1,
                                            context_length=512, checkpoint_every=10, **common),
                               llm="lora", resources=cpu, data=DataSection(replay=0.5)),
    )


def _paper(context: int) -> PresetDefaults:
    """The paper's recipe on GPUs: stage 1 projectors at LLaVA's 1e-3 with cosine decay; stage 2
    constant lr 2e-5, batch 12 (1 row x 6 accumulation x 2 workers), bf16 where the GPU has it.
    ``context`` is bounded by the LM's positions (TinyLlama 2048, Mistral 8192)."""
    gpu = ResourcesSection(num_workers=2, use_gpu=True, cpus_per_worker=4.0)
    return PresetDefaults(
        pretrain=StageDefaults(OptimSection(lr=1e-3, schedule="cosine", warmup_steps=10, context_length=min(context, 2048)),
                               llm="frozen", resources=gpu),
        finetune=StageDefaults(OptimSection(context_length=context), resources=gpu),
    )


JOB_DEFAULTS = {
    "tiny": _tiny,
    "small-real": _small_real,
    "tinyllama": lambda: _paper(2048),
    "mistral": lambda: _paper(8192),
}


def job_defaults(preset: str) -> PresetDefaults:
    if preset not in JOB_DEFAULTS:
        raise ValueError(f"no training defaults for preset {preset!r}; presets: {sorted(JOB_DEFAULTS)}")
    return JOB_DEFAULTS[preset]()
