"""Run a job as a subprocess with its whole output in a log file and one line on the terminal.

``make demo`` runs five jobs; each prints Ray's start-up, Ray Data's progress, DeepSpeed's set-up
and its workers' logs, which a reader of the demo does not need and a debugger does. So each job
writes to ``<logs>/<step>.log`` and the terminal shows one line per step: on a terminal it is
redrawn in place with the job's latest progress line while the job runs; in a pipe or file it is
printed once, when the job ends. A failed job prints the tail of its log and the log's path.
``verbose`` streams the job's output to the terminal as well.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

TAIL_ON_FAILURE = 40
"""Lines of a failed job's log shown on the terminal (the rest stays in the file)."""
REDRAW_S = 0.5
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class StepFailed(RuntimeError):
    pass


def run_logged(name: str, cmd: list[str], log_path: Path, *, cwd: Path, env: dict, verbose: bool) -> float:
    """Run ``cmd`` with stdout+stderr appended to ``log_path``; returns its seconds, or raises
    :class:`StepFailed` (after printing the log's tail) when it exits non-zero."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        status = _Status(name, start) if not verbose and sys.stdout.isatty() else None
        # Chunks, not lines: a progress bar redraws with \r and writes no newline until it ends.
        for raw in iter(lambda: proc.stdout.read1(1 << 16), b""):
            log.write(raw)
            if verbose:
                sys.stdout.write(raw.decode(errors="replace"))
                sys.stdout.flush()
            elif status is not None:
                status.update(raw.decode(errors="replace"))
        rc = proc.wait()
        if status is not None:
            status.close()
    if rc != 0:
        print(f"{name}: failed (exit code {rc}) after {time.time() - start:.0f} s; the last lines of {log_path}:")
        print("".join(tail(log_path, TAIL_ON_FAILURE)), end="", flush=True)
        raise StepFailed(f"step {name} failed (exit code {rc}); full log: {log_path}")
    return time.time() - start


def tail(path: Path, n: int) -> list[str]:
    with open(path, errors="replace") as f:
        return f.readlines()[-n:]


def last_json(path: Path) -> dict | None:
    """The last line of the log that parses as a JSON object (the jobs end with their summary)."""
    for line in reversed(tail(path, 200)):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


class _Status:
    """One terminal line redrawn in place: the step, its elapsed time, the job's latest line."""

    def __init__(self, name: str, start: float):
        self.name, self.start, self.latest = name, start, ""
        self.width = shutil.get_terminal_size((100, 20)).columns - 1
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._tick, daemon=True)
        self.thread.start()

    def update(self, chunk: str) -> None:
        # The job's current line: what follows its last \r or \n (tqdm redraws with \r); a chunk
        # that ends a line leaves the line it ended.
        segments = [t.strip() for t in re.split(r"[\r\n]", ANSI.sub("", chunk))]
        text = next((t for t in reversed(segments) if t), "")
        if text:
            with self.lock:
                self.latest = text

    def _tick(self) -> None:
        while not self.done.wait(REDRAW_S):
            with self.lock:
                line = f"{self.name}: {time.time() - self.start:4.0f} s  {self.latest}"
            sys.stdout.write("\r" + line[: self.width].ljust(self.width))
            sys.stdout.flush()

    def close(self) -> None:
        self.done.set()
        self.thread.join()
        sys.stdout.write("\r" + " " * self.width + "\r")
        sys.stdout.flush()


def verbose_from_env() -> bool:
    """``MMM_VERBOSE=1`` (what ``make demo VERBOSE=1`` sets) turns on verbose output."""
    return os.environ.get("MMM_VERBOSE", "").lower() in ("1", "true", "yes")
