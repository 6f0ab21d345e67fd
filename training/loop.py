"""The one training loop both stages run: Ray Train ``TorchTrainer`` workers driving DeepSpeed.

A job supplies a :class:`TrainConfig`, a Ray Dataset of training rows and :class:`TrainHooks`
(module-level functions: how to build the model inside a worker, how to turn rows into
micro-batches, how to export the final model) and calls :func:`fit`::

    hooks = TrainHooks(build_model=build_stage2_model, make_batches=packed_batches, export=export_model)
    result = fit(cfg, hooks, {"train": ray.data.read_parquet(...)}, resume=args.resume)

Each worker runs a fixed lifecycle -- setup (seed, build the model from the config, never from
``train_loop_config`` objects; ``deepspeed.initialize``; restore the latest Ray Train checkpoint)
-> train (optimizer steps until ``train.max_steps``; checkpoints every ``train.checkpoint_every``)
-> save (rank 0 exports the model with ZeRO-2's whole parameters, plus metrics.jsonl) -> cleanup.

Steps count optimizer steps. Each worker loops its Ray Data shard over epochs; ranks agree every
micro-batch on whether all still have data (one tiny all-reduce), so a shard that runs dry first
makes every rank start the next epoch together -- Ray's streaming split starts an epoch only when
all splits ask for it, and a rank waiting there while another waits in a gradient all-reduce
would hang. The ranks' leftovers of that epoch are skipped. A checkpoint keeps the epoch and how
many micro-batches of it each rank has taken (the same count on every rank): a resumed run rebuilds
that epoch in the same order (the shuffle is seeded per rank and epoch, and ``data.preserve_order``
keeps Ray's block order) and skips what was trained, so no row is trained twice or left out
because of the interruption. The skip renders and collates the skipped micro-batches again but
runs no forward pass.

Resume and failures: re-running with the same ``run.name`` and ``run.storage_path`` continues from
the latest checkpoint (Ray Train V2's auto-resume, through ``ray.train.get_checkpoint()``);
``FailureConfig(max_failures)`` restarts a worker group that lost a worker the same way, so the run
still ends at ``max_steps``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from training import storage
from training.metrics import TENSORBOARD, NullLogger, ProgressLogger, rank0_loggers
from training.config import TrainConfig

Batch = dict[str, Any]
CHECKPOINT_TAG = "step_{:08d}"
FORWARDED_ENV = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "RAY_AUTH_MODE", "TOKENIZERS_PARALLELISM",
                 "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
"""The driver's settings the workers need. No credential is among them: a runtime env is stored by
Ray and shown in its dashboard and job records. Workers take credentials from where their node has
them: the environment a local Ray inherits from the process that started it, or on a cluster the
nodes' own environment, instance role or service account (cluster/kuberay/serviceaccount.yaml)."""


def default_count_tokens(batch: Batch) -> int:
    """Real tokens in a micro-batch, for tokens/s: the collator's ``num_tokens`` (mmm.packing), else
    the attention mask's sum, else every input id."""
    if "num_tokens" in batch:
        return int(batch["num_tokens"])
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    ids = batch.get("input_ids")
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0


@dataclass(frozen=True)
class TrainHooks:
    """What differs between jobs. Use module-level functions: they travel to workers by reference."""

    build_model: Callable[[TrainConfig], torch.nn.Module]
    """In each worker: build or load the model and set what trains (cfg.llm). Seeded identically."""
    make_batches: Callable[[torch.nn.Module, TrainConfig, Iterable[dict]], Iterator[Batch]]
    """One epoch of this worker's rows (dicts) -> micro-batches, each called as ``model(**batch)``
    and returning an object with ``.loss`` (e.g. rows -> render -> mmm.packing.collate_packed). A
    batch's optional ``skipped_rows`` (rows dropped since the batch before) is summed into the log."""
    export: Callable[[torch.nn.Module, str, TrainConfig], None] | None = None
    """Rank 0 after the last step: write the final model into a local folder (e.g. save_pretrained)."""
    count_tokens: Callable[[Batch], int] = default_count_tokens
    model_inputs: Callable[[Batch], Batch] | None = None
    """Picks the forward's keyword arguments out of a batch (e.g. mmm.packing.model_inputs drops
    ``num_tokens``/``rows``); None passes the whole batch."""
    count_targets: Callable[[Batch], int] | None = None
    """How many targets the forward's ``.loss`` is the mean of, from the forward's arguments (e.g.
    mmm.model.labelled_tokens). With it, a step's gradient is the mean over every target of the
    step, all micro-batches and ranks together, as one large batch gives: a micro-batch with few
    labelled tokens no longer counts as much as one with many. None weighs micro-batches equally."""


# ---- driver side ------------------------------------------------------------------------------


def fit(cfg: TrainConfig, hooks: TrainHooks, datasets: dict[str, Any], resume: bool = False):
    """Run (or resume) training on Ray Train; returns the ``ray.train.Result``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = _resolved(cfg, resume)
    fs, path = _storage(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "hooks": hooks},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.resources.num_workers, use_gpu=cfg.resources.use_gpu,
            resources_per_worker={"CPU": cfg.resources.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            worker_runtime_env={"env_vars": worker_env(cfg)}),
        datasets=datasets,
        dataset_config=_data_config(cfg),
    )
    return trainer.fit()


def worker_env(cfg: TrainConfig) -> dict[str, str]:
    """The environment variables handed to the training workers (``FORWARDED_ENV``)."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    if not cfg.resources.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def _data_config(cfg: TrainConfig):
    """Ray Train's default ingest (the DataContext's limits), with the block order that
    ``data.preserve_order`` asks for. Built here rather than from ``default_ingest_options()``, which
    passes Ray Data's deprecated ``exclude_resources`` and warns."""
    import ray.data
    import ray.train

    current = ray.data.DataContext.get_current().execution_options
    options = ray.data.ExecutionOptions(resource_limits=current.resource_limits, preserve_order=cfg.data.preserve_order,
                                        verbose_progress=current.verbose_progress)
    return ray.train.DataConfig(execution_options=options)


def _resolved(cfg: TrainConfig, resume: bool) -> TrainConfig:
    """Absolute local paths (workers run elsewhere) and a run name that matches ``resume``."""
    run = cfg.run
    local = {k: os.path.abspath(v) for k in ("storage_path", "output_dir") if not storage.is_remote(v := getattr(run, k))}
    run = dataclasses.replace(run, **local)
    existing = sorted(n for n in storage.listdir(run.storage_path, run.s3_endpoint) if n.startswith(f"{cfg.stage}-"))
    name = run.name
    if name is None and resume:
        if not existing:
            raise FileNotFoundError(f"--resume: no {cfg.stage} run under {run.storage_path}; give run.name")
        name = existing[-1]
    name = name or f"{cfg.stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    has_ckpt = any(n.startswith("checkpoint_") for n in storage.listdir(f"{run.storage_path}/{name}", run.s3_endpoint))
    if has_ckpt and not resume:
        raise FileExistsError(f"run {name!r} already has checkpoints in {run.storage_path}: pass --resume to "
                              "continue it, or choose another run.name")
    if resume and not has_ckpt:
        raise FileNotFoundError(f"--resume: run {name!r} has no checkpoint in {run.storage_path}")
    return dataclasses.replace(cfg, run=dataclasses.replace(run, name=name))


def _storage(cfg: TrainConfig):
    if not storage.is_remote(cfg.run.storage_path):
        return None, cfg.run.storage_path
    if cfg.run.s3_endpoint:
        return storage.resolve(cfg.run.storage_path, cfg.run.s3_endpoint)
    return None, cfg.run.storage_path


# ---- worker side: setup -> train -> save -> cleanup ---------------------------------------------


@dataclass
class _Worker:
    cfg: TrainConfig
    hooks: TrainHooks
    engine: Any
    rank: int
    world: int
    start_step: int
    batches: "_SyncedBatches"
    records: Any
    """rank 0: metrics.jsonl; others: NullLogger."""
    bar: Any
    """rank 0 with run.progress: a progress bar updated every step; others: NullLogger."""
    metrics_path: str | None
    staging: str | None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function; ``config`` holds the config as plain data and the hooks."""
    w = _setup(TrainConfig.from_dict(config["cfg"]), config["hooks"])
    try:
        _train(w)
        _save(w)
    finally:
        _cleanup(w)


def _setup(cfg: TrainConfig, hooks: TrainHooks) -> _Worker:
    import deepspeed
    import ray.train

    from training.compat import skip_shm_comm_build
    from training.deepspeed_config import build_optimizer, build_scheduler, deepspeed_config, param_groups

    t0 = time.time()
    if not cfg.resources.use_gpu:
        skip_shm_comm_build()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed)  # identical init on every rank (DeepSpeed also broadcasts rank 0's)
    model = hooks.build_model(cfg)
    optimizer = build_optimizer(param_groups(model, cfg.train.weight_decay), cfg)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg),
                                      lr_scheduler=build_scheduler(optimizer, cfg))
    staging = None if rank else _metrics_dir(cfg)
    metrics_path = None if rank else os.path.join(staging, "metrics.jsonl")
    start = _restore(engine, metrics_path, cfg)
    start_step = start.step
    records = rank0_loggers(metrics_path, cfg.run.name or cfg.stage, _flat_params(cfg), start_step) if rank == 0 else NullLogger()
    bar = ProgressLogger(cfg.train.max_steps, start_step, cfg.stage) if rank == 0 and cfg.run.progress else NullLogger()
    records.event("start", start_step=start_step, epoch=start.epoch, skipped_micro_batches=start.epoch_batches, param_norm=_param_norm(engine.module), max_steps=cfg.train.max_steps, world_size=world,
                 global_batch=cfg.global_batch, bf16=bool(engine.bfloat16_enabled()), setup_s=round(time.time() - t0, 2))
    shard = ray.train.get_dataset_shard("train")
    epochs = _EpochRows(shard, cfg, rank)
    batches = _SyncedBatches(lambda e: hooks.make_batches(engine.module, cfg, epochs(e)), world, engine.device,
                             start.epoch, start.epoch_batches)
    return _Worker(cfg, hooks, engine, rank, world, start_step, batches, records, bar, metrics_path, staging)


def _flat_params(cfg: TrainConfig) -> dict[str, Any]:
    """The config as ``section.key`` -> value, for trackers that take flat parameters."""
    out = {}
    for section, values in cfg.to_dict().items():
        for key, value in (values.items() if isinstance(values, dict) else [("", values)]):
            out[f"{section}.{key}".rstrip(".")] = value
    return out


def _metrics_dir(cfg: TrainConfig) -> str:
    """Rank 0 writes metrics.jsonl straight into a local output_dir (tail-able); else a temp folder."""
    if storage.is_remote(cfg.run.output_dir):
        return tempfile.mkdtemp(prefix="mmm-metrics-")
    os.makedirs(cfg.run.output_dir, exist_ok=True)
    return cfg.run.output_dir


@dataclass(frozen=True)
class _Position:
    """Where training stands: the optimizer step done, the epoch, and micro-batches taken from it."""

    step: int = 0
    epoch: int = 0
    epoch_batches: int = 0


def _restore(engine, metrics_path: str | None, cfg: TrainConfig) -> _Position:
    """Load the latest Ray Train checkpoint if there is one; returns the position to continue from."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        if metrics_path:
            open(metrics_path, "w").close()  # a fresh run starts a fresh log
        return _Position()
    with ckpt.as_directory() as d:
        _, client_state = engine.load_checkpoint(d)
        if client_state is None:
            raise RuntimeError(f"checkpoint {ckpt.path} has no DeepSpeed state")
        if metrics_path:  # rank 0
            _restore_records(d, metrics_path, cfg)
    return _Position(**{k: int(client_state.get(k, 0)) for k in ("step", "epoch", "epoch_batches")})


def _restore_records(checkpoint: str, metrics_path: str, cfg: TrainConfig) -> None:
    """Rank 0: the run's history up to the checkpoint's step (metrics.jsonl, TensorBoard events:
    an s3:// output_dir starts empty), and what the resume changes."""
    if os.path.exists(os.path.join(checkpoint, "metrics.jsonl")):
        shutil.copyfile(os.path.join(checkpoint, "metrics.jsonl"), metrics_path)
    if os.path.isdir(os.path.join(checkpoint, TENSORBOARD)):
        shutil.copytree(os.path.join(checkpoint, TENSORBOARD), os.path.join(os.path.dirname(metrics_path), TENSORBOARD),
                        dirs_exist_ok=True)
    _warn_changed(os.path.join(checkpoint, "train_config.json"), cfg)


RESUMED_AS_SAVED = ("lr", "weight_decay", "betas", "eps", "grad_clip")
"""Optimizer settings DeepSpeed restores from a checkpoint: a resume with other values keeps the saved ones."""


def _warn_changed(saved_config: str, cfg: TrainConfig) -> None:
    """Say which ``train`` settings a resume changes, and which of them it cannot change."""
    if not os.path.exists(saved_config):
        return
    with open(saved_config) as f:
        saved = json.load(f).get("train", {})
    now = cfg.to_dict()["train"]
    for key in sorted(k for k in now if k in saved and saved[k] != now[k]):
        effect = "kept as saved (DeepSpeed restores it)" if key in RESUMED_AS_SAVED else "applies from here on"
        print(f"resume: train.{key} {saved[key]} -> {now[key]}: {effect}", flush=True)


def _train(w: _Worker) -> None:
    cfg, engine = w.cfg, w.engine
    t = cfg.train
    # target-weighted loss sum, targets, micro-batches, tokens, rows skipped since the last log
    window = torch.zeros(5, dtype=torch.float64)
    window_start = time.time()
    for step in range(w.start_step + 1, t.max_steps + 1):
        local = torch.zeros(5, dtype=torch.float64)
        lr = float(engine.get_lr()[0])  # this step's: engine.step() moves the schedule on to the next
        batches = [w.batches.next() for _ in range(t.grad_accum)]
        inputs = [w.hooks.model_inputs(b) if w.hooks.model_inputs else b for b in batches]
        targets, scale = _targets(w, inputs)
        for batch, kwargs, n in zip(batches, inputs, targets):
            loss = engine(**_to_device(kwargs, engine.device, torch.bfloat16 if engine.bfloat16_enabled() else None)).loss
            engine.backward(loss * (n * scale))
            engine.step()
            local += torch.tensor([float(loss.detach()) * n, n, 1.0, float(w.hooks.count_tokens(batch)),
                                   float(batch.get("skipped_rows", 0))], dtype=torch.float64)
        window += _all_reduce_sum(local, w.world, engine.device)
        metrics = {"loss": float(window[0] / max(float(window[1]), 1e-9)), "lr": lr, "epoch": w.batches.epoch}
        w.bar.log(step, metrics)
        checkpoint = step % t.checkpoint_every == 0 or step == t.max_steps
        if checkpoint:
            metrics["param_norm"] = _param_norm(engine.module)
        if step % t.log_every == 0 or checkpoint:
            elapsed = time.time() - window_start
            metrics.update(tokens_per_s=float(window[3]) / max(elapsed, 1e-9), steps_per_s=_steps(window, w) / max(elapsed, 1e-9),
                           skipped_rows=int(window[4]))
            w.records.log(step, metrics)
            window.zero_()
            window_start = time.time()
        if checkpoint:
            _checkpoint(w, step, metrics)


def _param_norm(module: torch.nn.Module) -> float:
    """L2 norm of the trainable weights: logged at checkpoints and at (re)start to show a resume
    restored exactly the weights that were saved."""
    with torch.no_grad():
        return float(sum(p.detach().float().pow(2).sum() for p in module.parameters() if p.requires_grad) ** 0.5)


def _steps(window: torch.Tensor, w: _Worker) -> float:
    return float(window[2]) / (w.world * w.cfg.train.grad_accum)


def _targets(w: _Worker, inputs: list[Batch]) -> tuple[list[float], float]:
    """Each micro-batch's number of targets, and the factor that turns a micro-batch's mean loss
    times its targets into its share of the step's mean over all targets of all ranks. DeepSpeed
    divides each backward's loss by the accumulation steps and averages gradients over ranks, so
    the factor multiplies both back in. Without ``count_targets``: 1 and 1, the plain means."""
    if w.hooks.count_targets is None:
        return [1.0] * len(inputs), 1.0
    counts = [float(w.hooks.count_targets(kwargs)) for kwargs in inputs]
    total = float(_all_reduce_sum(torch.tensor([sum(counts)], dtype=torch.float64), w.world, w.engine.device)[0])
    return counts, len(inputs) * w.world / max(total, 1.0)


def _checkpoint(w: _Worker, step: int, metrics: dict[str, float]) -> None:
    """Every rank saves its DeepSpeed shard into a temp folder; Ray Train merges them in storage."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="mmm-ckpt-") as tmp:
        position = {"step": step, "epoch": w.batches.epoch, "epoch_batches": w.batches.served}
        w.engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG.format(step), client_state=position)
        if w.rank == 0:
            shutil.copyfile(w.metrics_path, os.path.join(tmp, "metrics.jsonl"))
            events = os.path.join(os.path.dirname(w.metrics_path), TENSORBOARD)
            if os.path.isdir(events):
                shutil.copytree(events, os.path.join(tmp, TENSORBOARD))
            with open(os.path.join(tmp, "train_config.json"), "w") as f:
                json.dump(w.cfg.to_dict(), f, indent=1)
        ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{step:08d}")


def _save(w: _Worker) -> None:
    """Rank 0 exports the model (ZeRO-2 keeps whole parameters on every rank) and the metrics."""
    if w.rank != 0:
        return
    w.records.event("end", step=w.cfg.train.max_steps)
    w.records.close()
    out = w.cfg.run.output_dir
    local = out if not storage.is_remote(out) else w.staging
    if w.hooks.export is not None:
        w.hooks.export(w.engine.module, os.path.join(local, "model"), w.cfg)
    storage.upload_dir(local, out, w.cfg.run.s3_endpoint)


def _cleanup(w: _Worker) -> None:
    w.records.close()
    w.bar.close()
    if w.staging and storage.is_remote(w.cfg.run.output_dir):
        shutil.rmtree(w.staging, ignore_errors=True)


# ---- data ---------------------------------------------------------------------------------------


class _EpochRows:
    """``epochs(e)`` -> this worker's rows for epoch ``e``, shuffled with a seed per (rank, epoch), so
    a resumed run sees an epoch in the order the interrupted one did."""

    def __init__(self, shard, cfg: TrainConfig, rank: int):
        self.shard, self.cfg, self.rank = shard, cfg, rank

    def __call__(self, epoch: int) -> Iterator[dict]:
        buf = self.cfg.data.shuffle_buffer
        seed = self.cfg.train.seed + 1009 * epoch + self.rank
        for table in self.shard.iter_batches(batch_size=64, batch_format="pyarrow",
                                             local_shuffle_buffer_size=buf or None, local_shuffle_seed=seed if buf else None):
            yield from table.to_pylist()


class _SyncedBatches:
    """Micro-batches from per-epoch iterators; all ranks switch epochs together (see module doc).
    Starts in ``epoch`` after skipping the ``skip`` micro-batches an interrupted run already took."""

    def __init__(self, epoch_batches: Callable[[int], Iterator[Batch]], world: int, device, epoch: int = 0, skip: int = 0):
        self._epoch_batches, self._world, self._device = epoch_batches, world, device
        self.epoch, self.served = epoch, 0
        self._it = iter(epoch_batches(epoch))
        for _ in range(skip):
            self.next()

    def next(self) -> Batch:
        for _ in range(2):  # the current epoch, else one fresh epoch, must serve every rank
            batch = next(self._it, None)
            have = torch.tensor([0.0 if batch is None else 1.0], dtype=torch.float64)
            if self._world == 1 or float(_all_reduce_sum(have, self._world, self._device)) == self._world:
                if batch is not None:
                    self.served += 1
                    return batch
            self.epoch, self.served = self.epoch + 1, 0
            self._it = iter(self._epoch_batches(self.epoch))
        raise RuntimeError("a fresh epoch gave some worker no micro-batch: the dataset has too few rows for "
                           "num_workers x micro_batch_size (or make_batches yields nothing)")


def _all_reduce_sum(x: torch.Tensor, world: int, device) -> torch.Tensor:
    if world == 1:
        return x
    import torch.distributed as dist

    y = x.to(device)
    dist.all_reduce(y)
    return y.cpu()


def _to_device(obj: Any, device, float_dtype: torch.dtype | None) -> Any:
    """Tensors (also inside lists/dicts) to the device; floats to the compute dtype under bf16."""
    if isinstance(obj, torch.Tensor):
        obj = obj.to(device)
        return obj.to(float_dtype) if float_dtype is not None and obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _to_device(v, device, float_dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device, float_dtype) for v in obj)
    return obj
