"""A local `ray start --head` cluster owned by one process and stopped by the PIDs of its session.

Used by ``make demo`` (jobs/demo.py) and the cluster-path test. Every server listens on
127.0.0.1 on free ports, in a private temp dir, with token auth off (a single-user local
cluster). ``ray start`` daemonizes, so it runs in a new session: every process the cluster
starts inherits that session id, and :meth:`LocalRayCluster.stop` signals exactly those PIDs,
never ``ray stop`` (which kills every Ray process on the machine by name).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
START_TIMEOUT_S = 300


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cluster_env() -> dict[str, str]:
    """Environment of `ray start` and the CLI; the daemons, and so the job driver, inherit it."""
    env = dict(os.environ)
    env.update(
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        # `python` in the entrypoint is resolved by the driver's shell: make it this venv's.
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        DS_ACCELERATOR="cpu",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("RAY_ADDRESS", None)  # never attach to some other cluster
    return env


class LocalRayCluster:
    """A `ray start --head` cluster owned by this process, stopped by the PIDs of its session."""

    def __init__(self, num_cpus: int = 4):
        self.num_cpus = num_cpus
        # Short path: Ray's unix sockets live under it and sun_path is limited to 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="mmm-ray-", dir="/tmp")
        self.env = cluster_env()
        self.sid: int | None = None
        (self.gcs_port, self.dashboard_port, self.client_port, self.agent_http_port, self.agent_grpc_port,
         self.metrics_port, self.runtime_env_port, self.node_manager_port, self.object_manager_port) = free_ports(9)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> None:
        cmd = [
            RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self.client_port}",
            f"--dashboard-agent-listen-port={self.agent_http_port}",
            f"--dashboard-agent-grpc-port={self.agent_grpc_port}",
            f"--metrics-export-port={self.metrics_port}", f"--runtime-env-agent-port={self.runtime_env_port}",
            f"--node-manager-port={self.node_manager_port}", f"--object-manager-port={self.object_manager_port}",
            f"--num-cpus={self.num_cpus}", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
        ]
        # A new session: `ray start` becomes its leader, so sid == its pid, and every daemon it
        # forks (and everything those start) carries that sid after `ray start` itself exits.
        # The daemons pass their environment on to every worker and actor. With RAY_ADDRESS naming
        # this cluster, Ray's own helpers that look a cluster up by address (the State API that Ray
        # Train's PlacementGroupCleaner polls) find this one, not "multiple active Ray instances"
        # when other clusters run on the machine, which fails that actor and floods the job's log.
        daemon_env = self.env | {"RAY_ADDRESS": f"127.0.0.1:{self.gcs_port}"}
        proc = subprocess.Popen(cmd, env=daemon_env, cwd=self.temp_dir, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.sid = proc.pid
        try:
            out, _ = proc.communicate(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed ({proc.returncode}):\n{out[-4000:]}")
        self._wait_for_jobs_api()

    def _wait_for_jobs_api(self) -> None:
        """`ray start` returns before the job agent registers; submitting too early is a 500."""
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.address}/api/jobs/", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"jobs API at {self.address} did not come up; logs in {self.temp_dir}")

    def pids(self) -> list[int]:
        """PIDs of every process in this cluster's session (never this test's own)."""
        own = os.getsid(0)
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                sid = os.getsid(int(entry))
            except OSError:
                continue
            if sid == self.sid and sid != own:
                found.append(int(entry))
        return found

    def stop(self, grace_s: float = 8.0, keep_logs: Path | None = None) -> None:
        """SIGTERM the session's processes, SIGKILL what is left after ``grace_s``, remove the temp dir
        (which holds ``ray_current_cluster``, so no later ``ray.init`` retries this dead address).
        ``keep_logs``: copy the session's logs (GCS, raylet, workers, jobs) there first; the temp dir
        itself has to stay short (Ray's unix sockets live under it)."""
        if self.sid is not None:
            _signal_all(self.pids(), signal.SIGTERM)
            deadline = time.time() + grace_s
            while self.pids() and time.time() < deadline:
                time.sleep(0.25)
            _signal_all(self.pids(), signal.SIGKILL)
            deadline = time.time() + 5
            while self.pids() and time.time() < deadline:
                time.sleep(0.1)
        if keep_logs is not None:
            self.copy_logs(keep_logs)
        Path(self.temp_dir, "ray_current_cluster").unlink(missing_ok=True)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def copy_logs(self, dest: Path) -> None:
        """The session's log folder, copied to ``dest`` (merged into what an earlier run left)."""
        logs = Path(self.temp_dir, "session_latest", "logs")
        if logs.is_dir():
            shutil.copytree(logs, dest, dirs_exist_ok=True, ignore_dangling_symlinks=True,
                            ignore=shutil.ignore_patterns("*.sock", "*.pipe"))

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def job_info(self, job_id: str) -> dict:
        with urllib.request.urlopen(f"{self.address}/api/jobs/{job_id}", timeout=10) as r:
            return json.load(r)


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
