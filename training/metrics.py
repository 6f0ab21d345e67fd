"""Small metric loggers for training jobs: a no-op default, a JSONL file, TensorBoard, MLflow, a
progress bar.

Only rank 0 gets a real logger (the loop hands the others :class:`NullLogger`), so there is one
line per step however many workers run. Each JSONL line is one record: ``{"step": 10, "loss": ...}``
for metrics, ``{"event": "start", "start_step": 4, ...}`` for lifecycle events; the loss curves of
jobs/evaluate.py are read from these files.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Protocol


class MetricsLogger(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def event(self, name: str, **fields: Any) -> None: ...
    def close(self) -> None: ...


class NullLogger:
    """The default: every call does nothing (non-zero ranks, tests that do not care)."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def event(self, name: str, **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlLogger:
    """Appends one JSON object per line and flushes it, so a crash loses nothing already logged."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f = open(path, "a")

    def _write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._write({"step": step, "time": round(time.time(), 3), **metrics})

    def event(self, name: str, **fields: Any) -> None:
        self._write({"event": name, "time": round(time.time(), 3), **fields})

    def close(self) -> None:
        self._f.close()


class TensorBoardLogger:
    """Scalars under ``<dir>`` (``tensorboard --logdir <dir>``), one tag per metric (``train/loss``)."""

    def __init__(self, logdir: str, start_step: int = 0):
        """A fresh run (``start_step`` 0) starts a fresh log; a resumed one drops the events logged
        after its checkpoint, so a step is never plotted twice."""
        from torch.utils.tensorboard import SummaryWriter

        if start_step == 0:
            shutil.rmtree(logdir, ignore_errors=True)
        self.logdir = logdir
        self._writer = SummaryWriter(log_dir=logdir, purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self._writer.add_scalar(f"train/{key}", value, step)
        self._writer.flush()

    def event(self, name: str, **fields: Any) -> None:
        self._writer.add_text(f"events/{name}", json.dumps(fields, default=str))

    def close(self) -> None:
        self._writer.close()


class MlflowLogger:
    """Metrics to MLflow's active tracking server (``MLFLOW_TRACKING_URI``), one run per training run."""

    def __init__(self, run_name: str, params: dict[str, Any]):
        import mlflow

        self._mlflow = mlflow
        self._run = mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: str(v)[:250] for k, v in params.items()})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def event(self, name: str, **fields: Any) -> None:
        pass

    def close(self) -> None:
        self._mlflow.end_run()


def mlflow_configured() -> bool:
    """MLflow logging is on when the package is installed and a tracking URI is set."""
    import importlib.util

    return bool(os.environ.get("MLFLOW_TRACKING_URI")) and importlib.util.find_spec("mlflow") is not None


TENSORBOARD = "tensorboard"
"""Folder of the TensorBoard events, beside metrics.jsonl (and inside each checkpoint)."""


def rank0_loggers(metrics_path: str, run_name: str, params: dict[str, Any], start_step: int = 0) -> MetricsLogger:
    """Rank 0's record of a run: metrics.jsonl, TensorBoard events beside it (``tensorboard/``), and
    MLflow when configured (a resumed run is a new MLflow run from ``start_step``). TensorBoard is
    optional: without the package the run logs the rest."""
    loggers: list[MetricsLogger] = [JsonlLogger(metrics_path)]
    try:
        loggers.append(TensorBoardLogger(os.path.join(os.path.dirname(metrics_path), TENSORBOARD), start_step))
    except ImportError:
        pass
    if mlflow_configured():
        loggers.append(MlflowLogger(run_name, params))
    return MultiLogger(*loggers)


class ProgressLogger:
    """A progress bar over optimizer steps showing the latest loss; Ray's tqdm inside workers."""

    def __init__(self, total: int, initial: int, desc: str):
        try:  # inside a Ray worker, tqdm_ray renders one clean bar on the driver's console
            from ray.experimental.tqdm_ray import tqdm
        except ImportError:  # pragma: no cover - ray is a dependency; plain tqdm elsewhere
            from tqdm import tqdm
        self._bar = tqdm(total=total, desc=desc)  # tqdm_ray takes no `initial`
        self._bar.update(initial)
        self._last = initial

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._bar.update(step - self._last)
        self._last = step
        if "loss" in metrics:
            self._bar.set_description(f"loss {metrics['loss']:.4f}")

    def event(self, name: str, **fields: Any) -> None:
        pass

    def close(self) -> None:
        self._bar.close()


class MultiLogger:
    def __init__(self, *loggers: MetricsLogger):
        self.loggers = loggers

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for lg in self.loggers:
            lg.log(step, metrics)

    def event(self, name: str, **fields: Any) -> None:
        for lg in self.loggers:
            lg.event(name, **fields)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
