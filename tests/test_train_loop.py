"""The shared training loop (training/loop.py) on local Ray with 2 CPU workers and DeepSpeed ZeRO-2.

A tiny stand-in model (regression MLP; ``model(**batch).loss``) keeps this about the machinery:
the loss falls; a worker that dies mid-run is replaced and the run still ends at max_steps;
ranks whose shards give different numbers of batches switch epochs together (no hang); an
interrupted run resumes from its saved step and its place in the epoch. Two ``trainer.fit`` calls in
all (~25 s start-up each).
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from types import SimpleNamespace

import pytest
import torch

from training import storage
from training.deepspeed_config import deepspeed_config, lr_lambda
from training.metrics import read_jsonl
from training.config import load_config
from training.loop import TrainHooks, fit
from pipelines.runtime import start_local_ray

DIM = 8
GRAD_ACCUM = 2
ROWS = 48


class StandIn(torch.nn.Module):
    """y = f(x) regression; rank 1 raises once at forward ``fail_at`` when ``marker`` does not exist.
    Rank 0 appends each micro-batch it trains on (its first x, and its process) to ``marker.rank0``."""

    def __init__(self, marker: str | None, fail_at: int | None):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(DIM, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        self.marker, self.fail_at, self.calls = marker, fail_at, 0

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> SimpleNamespace:  # x (B, DIM), y (B,)
        self.calls += 1
        if self.marker and torch.distributed.get_rank() == 0:
            with open(self.marker + ".rank0", "a") as f:
                f.write(f"{os.getpid()} {float(x[0, 0]):.6f}\n")
        if self.fail_at and self.calls == self.fail_at and torch.distributed.get_rank() == 1 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            raise RuntimeError("injected worker failure")
        return SimpleNamespace(loss=torch.nn.functional.mse_loss(self.net(x).squeeze(-1), y))


def trained_batches(log: str) -> list[list[str]]:
    """Rank 0's micro-batches from a ``StandIn`` log, one list per worker process in order."""
    runs: dict[str, list[str]] = {}
    with open(log) as f:
        for pid, key in (line.split() for line in f):
            runs.setdefault(pid, []).append(key)
    return list(runs.values())


def build_standin(cfg, marker=None, fail_at=None) -> torch.nn.Module:
    return StandIn(marker, fail_at)


def batches_by_rank(model, cfg, rows):
    """Rank 1 keeps half its rows, so its epochs end first: exercises the synchronized epoch switch.
    Each batch reports the rows dropped since the batch before as ``skipped_rows``."""
    rank = torch.distributed.get_rank()
    group, skipped = [], 0
    for i, row in enumerate(rows):
        if rank == 1 and i % 2:
            skipped += 1
            continue
        group.append(row)
        if len(group) == cfg.train.micro_batch_size:
            yield {"x": torch.tensor([r["x"] for r in group]), "y": torch.tensor([r["y"] for r in group]), "skipped_rows": skipped}
            group, skipped = [], 0


def xy(batch: dict) -> dict:
    return {"x": batch["x"], "y": batch["y"]}


def export_state(model, out_dir, cfg) -> None:
    os.makedirs(out_dir, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(out_dir, "model.pt"))


def _rows(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, DIM, generator=g)
    y = torch.sin(x[:, 0]) + 0.5 * x[:, 1] - 0.3 * x[:, 2] * x[:, 3]
    return [{"x": xi.tolist(), "y": float(yi)} for xi, yi in zip(x, y)]


@pytest.fixture(scope="module")
def s3():
    """A local S3 (moto) on 127.0.0.1 with bucket ``mmm-test``; yields its endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="mmm-test")
    yield endpoint
    server.stop()


@pytest.fixture(scope="module")
def ray_local(s3):
    import ray
    from ray import cloudpickle

    for k, v in {"DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                 "TORCH_EXTENSIONS_DIR": os.path.abspath(".venv/torch_extensions")}.items():
        os.environ.setdefault(k, v)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    start_local_ray(num_cpus=4, include_dashboard=False, _temp_dir=tmp, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


def _config(work, s3: str, max_steps: int):
    """Checkpoints go to S3 (so failure recovery and resume read them back from there); the export and
    metrics.jsonl to a local folder."""
    return load_config("finetune", overrides=[
        f"train.max_steps={max_steps}", "train.checkpoint_every=2", "train.log_every=1",
        "train.micro_batch_size=4", f"train.grad_accum={GRAD_ACCUM}", "train.lr=3e-2", "train.schedule=linear",
        "train.min_lr_ratio=0.1", "train.warmup_steps=0", "data.shuffle_buffer=16", "resources.num_workers=2",
        "run.name=loop", f"run.storage_path=s3://mmm-test/{work.name}", f"run.s3_endpoint={s3}",
        f"run.output_dir={work}/out", "run.max_failures=1",
        "run.progress=false", "deepspeed.bf16=false",
    ])


def _full_loss(state_dict: dict | None) -> float:
    """MSE of a stand-in over all rows: the seed-0 init (None) or exported weights."""
    torch.manual_seed(0)  # the loop seeds train.seed (0) before build_model
    model = StandIn(None, None)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    rows = _rows(ROWS)
    with torch.no_grad():
        return float(model(torch.tensor([r["x"] for r in rows]), torch.tensor([r["y"] for r in rows])).loss)


def _records(work):
    log = read_jsonl(str(work / "out" / "metrics.jsonl"))
    return [r for r in log if r.get("event") == "start"], [r for r in log if "loss" in r]


@pytest.fixture(scope="module")
def first_run(ray_local, s3, work):
    """6 steps, checkpoints every 2; rank 1 dies once in step 3, so the group restarts from step 2."""
    marker = str(work / "failed-once")
    hooks = TrainHooks(build_model=functools.partial(build_standin, marker=marker, fail_at=3 * GRAD_ACCUM),
                       make_batches=batches_by_rank, export=export_state, model_inputs=xy)
    # rank 0 gets ~24 rows (6 micro-batches an epoch), rank 1 keeps ~12 (3): epochs end unevenly.
    result = fit(_config(work, s3, 6), hooks, {"train": ray_local.data.from_items(_rows(ROWS))})
    return SimpleNamespace(result=result, marker=marker, exported=torch.load(work / "out" / "model" / "model.pt"))


@pytest.mark.timeout(300)
def test_loss_falls_and_model_is_exported(first_run):
    assert first_run.result.metrics["step"] == 6
    before, after = _full_loss(None), _full_loss(first_run.exported)
    assert after < 0.6 * before, (before, after)


@pytest.mark.timeout(300)
def test_lost_worker_is_replaced_and_run_ends_at_max_steps(first_run, s3, work):
    assert os.path.exists(first_run.marker), "the injected failure never fired"
    starts, steps = _records(work)
    assert [r["start_step"] for r in starts] == [0, 2], "expected a fresh start and a restart from step 2"
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]  # history restored from the checkpoint, no repeats
    assert starts[1]["param_norm"] == pytest.approx(steps[1]["param_norm"], rel=1e-6)  # weights restored exactly
    f = lr_lambda(_config(work, s3, 6))
    assert [r["lr"] for r in steps] == pytest.approx([3e-2 * f(s - 1) for s in range(1, 7)])  # the lr each step used
    assert steps[-1]["epoch"] >= 2, "rank 1's short epochs should have forced synchronized epoch switches"
    # rank 1 drops a row after each it keeps: 3 or 4 per micro-batch of 4, two micro-batches a step
    assert all(6 <= r["skipped_rows"] <= 8 for r in steps), [r["skipped_rows"] for r in steps]


@pytest.mark.timeout(300)
def test_restart_continues_inside_its_epoch(first_run):
    """The restart from step 2 trains on what the failed run would have trained next: its first
    micro-batches are the failed run's 5th onwards (2 steps x 2 micro-batches were checkpointed)."""
    failed, restarted = trained_batches(first_run.marker + ".rank0")
    done = 2 * GRAD_ACCUM
    assert len(failed) > done, failed
    assert restarted[:len(failed) - done] == failed[done:], (failed, restarted)


@pytest.mark.timeout(300)
def test_resume_continues_from_saved_step(ray_local, s3, work, first_run):
    hooks = TrainHooks(build_model=build_standin, make_batches=batches_by_rank, export=export_state, model_inputs=xy)
    data = {"train": ray_local.data.from_items(_rows(ROWS))}
    with pytest.raises(FileExistsError, match="--resume"):
        fit(_config(work, s3, 8), hooks, data)  # same name without --resume: refused, not silently resumed
    result = fit(_config(work, s3, 8), hooks, data, resume=True)

    assert result.metrics["step"] == 8
    starts, steps = _records(work)
    assert starts[-1]["start_step"] == 6
    assert starts[-1]["param_norm"] == pytest.approx(steps[5]["param_norm"], rel=1e-6)
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert steps[6]["epoch"] >= steps[5]["epoch"], "a resume continues the epoch count"
    assert starts[-1]["epoch"] == steps[5]["epoch"], "the resume starts in the epoch the checkpoint was in"
    # TensorBoard too: the restart from step 2 and the resume from step 6 plot no step twice
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(work / "out" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))

    assert "checkpoint_00000008" in storage.listdir(f"s3://mmm-test/{work.name}/loop", s3)


def test_workers_get_settings_but_no_credentials(monkeypatch, tmp_path):
    """A runtime env is stored and shown by Ray: secrets stay out of it (the workers above still
    reached S3, through the environment their local Ray inherited)."""
    from training.loop import worker_env

    for k, v in {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_SESSION_TOKEN": "token",
                 "AWS_DEFAULT_REGION": "us-east-1", "TOKENIZERS_PARALLELISM": "false"}.items():
        monkeypatch.setenv(k, v)
    env = worker_env(load_config("finetune", overrides=["resources.use_gpu=false"]))
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(env)
    assert env["AWS_DEFAULT_REGION"] == "us-east-1" and env["DS_ACCELERATOR"] == "cpu" and env["TOKENIZERS_PARALLELISM"] == "false"


def test_upload_dir_to_s3(s3, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.bin").write_bytes(b"abc")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    storage.upload_dir(str(tmp_path), "s3://mmm-test/exported", s3)
    assert sorted(storage.listdir("s3://mmm-test/exported", s3)) == ["metrics.jsonl", "model"]
    assert storage.exists("s3://mmm-test/exported/model/w.bin", s3)


def test_config_layers_and_clear_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n  max_steps: 50\nrun:\n  name: exp\n")
    cfg = load_config("finetune", str(path), ["train.max_steps=7", "deepspeed.offload_optimizer=true"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.run.name, cfg.deepspeed.offload_optimizer) == (1e-4, 7, "exp", True)
    assert isinstance(cfg.train.lr, float)  # YAML 1.1 reads 1e-4 as a string; coerced by the field type
    assert load_config("pretrain").llm == "frozen"
    for bad, match in [(["train.lrr=1"], "unknown config key 'train.lrr'"), (["train.max_steps=1.5"], "integer"),
                       (["train.lr=fast"], "train.lr"), (["llm=lora"], "frozen"), (["nonsense"], "key=value")]:
        with pytest.raises(ValueError, match=match):
            load_config("pretrain", None, bad)


def test_str_fields_keep_the_text_typed_where_yaml_reads_a_date_bool_or_octal(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  name: no\n  s3_endpoint: 0123\n")
    cfg = load_config("pretrain", str(path))
    assert (cfg.run.name, cfg.run.s3_endpoint) == ("no", "0123")  # not False and 83
    cfg = load_config("pretrain", str(path), ["run.name=2024-12-07", "run.s3_endpoint=null", "deepspeed.bf16=true"])
    assert (cfg.run.name, cfg.run.s3_endpoint, cfg.deepspeed.bf16) == ("2024-12-07", None, True)  # bf16: str | bool


def test_every_config_problem_is_one_usage_line_naming_it(tmp_path, capsys):
    from jobs import pretrain, synthesize

    (tmp_path / "bad.yaml").write_text("run:\n  name: [a\n")
    for job, bad_key in [(pretrain, "train.lrr"), (synthesize, "dialogues.nope")]:
        for argv, named in [([f"{bad_key}=1"], bad_key), (["seed=abc" if job is synthesize else "train.seed=abc"], "seed"),
                            (["--config", str(tmp_path / "none.yaml")], "none.yaml: No such file"),
                            (["--config", str(tmp_path / "bad.yaml")], "bad.yaml: invalid YAML: line 3")]:
            with pytest.raises(SystemExit) as e:
                job.main(argv)
            error = capsys.readouterr().err.strip().splitlines()[-1]
            assert e.value.code == 2 and "error: " in error and named in error, (job.__name__, argv, error)


def test_training_jobs_help_lists_every_field_with_the_jobs_default(capsys):
    from jobs import finetune, pretrain

    for job, output, steps in [(pretrain, "outputs/demo/stage1", 60), (finetune, "outputs/demo/stage2", 1600)]:
        with pytest.raises(SystemExit) as e:
            job.main(["--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0
        assert f'run.output_dir = "{output}"' in out and f"train.max_steps = {steps}" in out and "lora.r = 16" in out


def test_deepspeed_config_is_derived_from_the_typed_config(monkeypatch):
    from mmm import precision

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    cfg = load_config("finetune", overrides=["model.preset=mistral", "resources.use_gpu=false", "train.micro_batch_size=1", "train.grad_accum=6",
                                             "resources.num_workers=2", "deepspeed.offload_optimizer=true"])
    ds = deepspeed_config(cfg)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (12, 1, 6)
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] is False  # auto on CPU workers without bf16 instructions
    assert (cfg.train.lr, cfg.train.schedule, cfg.train.context_length) == (2e-5, "constant", 8192)  # the paper's stage 2
    assert {lr_lambda(cfg)(s) for s in (0, 100, 999)} == {1.0}
    warm = load_config("pretrain", overrides=["train.warmup_steps=4", "train.max_steps=10", "train.schedule=cosine"])
    f = lr_lambda(warm)
    assert f(0) == pytest.approx(0.25) and f(3) == pytest.approx(1.0) and f(9) < f(5) < f(4)


def test_compat_deepspeed_still_builds_its_shm_op_where_training_skips_it():
    """training/compat.py replaces DeepSpeed's CPU shm-op builder; this fails when upstream moves it,
    stops calling it from the backend, or stops treating None as "use torch.distributed"."""
    import importlib
    import inspect

    from training import compat

    module = importlib.import_module(compat.SHM_MODULE)
    init = inspect.getsource(module.TorchBackend.__init__)
    assert f"{compat.SHM_BUILDER}()" in init, "DeepSpeed's backend no longer builds the shm op at init"
    assert "shm_comm_op != None" in init or "shm_comm_op is not None" in init, "no fallback when the op is None"
    original = getattr(module, compat.SHM_BUILDER)
    try:
        compat.skip_shm_comm_build()
        assert getattr(module, compat.SHM_BUILDER)() is None
    finally:
        setattr(module, compat.SHM_BUILDER, original)


def test_stage2_trains_the_lm_as_llm_says():
    from training.stages import llm_trains

    assert llm_trains(load_config("finetune", overrides=["llm=frozen"])) is False
    assert llm_trains(load_config("finetune", overrides=["llm=full"])) is True
    cfg = load_config("finetune", overrides=["llm=lora", "lora.r=4"])
    assert llm_trains(cfg) is cfg.lora and cfg.lora.r == 4


def test_micro_batches_weighted_by_their_labelled_tokens_give_one_large_batchs_gradient():
    """Two micro-batches, one with a short answer and one with a long one: each one's mean loss
    times its share (training/loop.py, ``_targets``), divided by the accumulation steps as
    DeepSpeed's backward does, gives the gradient of one batch holding both rows. Equal weights,
    a mean of means, would over-weigh the short answer's tokens."""
    from mmm.config import preset
    from mmm.model import MMMModel, labelled_tokens
    from training.loop import _targets

    torch.manual_seed(0)
    model = MMMModel.build(preset("tiny"))
    model.set_trainable(projectors=True, llm=True)
    chats = [[{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}],
             [{"role": "user", "content": "and then?"}, {"role": "assistant", "content": "a much longer answer of many words, one after another"}]]
    rendered = [model.render(c, []) for c in chats]
    width = max(len(r.input_ids) for r in rendered)
    pad = lambda xs, v: xs + [v] * (width - len(xs))  # noqa: E731
    micro = [{"input_ids": torch.tensor([r.input_ids]), "labels": torch.tensor([r.labels])} for r in rendered]
    large = {"input_ids": torch.tensor([pad(r.input_ids, 0) for r in rendered]),
             "labels": torch.tensor([pad(r.labels, -100) for r in rendered]),
             "attention_mask": torch.tensor([pad([1] * len(r.input_ids), 0) for r in rendered])}

    def grads(losses) -> torch.Tensor:
        model.zero_grad()
        for loss in losses():
            loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    worker = SimpleNamespace(hooks=SimpleNamespace(count_targets=labelled_tokens), world=1, engine=SimpleNamespace(device="cpu"))
    counts, scale = _targets(worker, micro)
    assert counts[0] < counts[1] / 3 and scale == 2 / sum(counts)
    one_batch = grads(lambda: [model(**large).loss])
    weighted = grads(lambda: [model(**m).loss * (n * scale) / len(micro) for m, n in zip(micro, counts)])
    equal = grads(lambda: [model(**m).loss / len(micro) for m in micro])
    assert torch.allclose(weighted, one_batch, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(equal, one_batch, rtol=1e-2, atol=1e-5)
