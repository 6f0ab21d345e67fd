"""The cluster path, end to end on one machine: ``ray start --head`` -> ``ray job submit`` -> SUCCEEDED.

What a user does on a real cluster (README, cluster/launcher.yaml), against a local head:

    ray start --head --node-ip-address=127.0.0.1 ...
    ray job submit --address http://127.0.0.1:<dashboard> --runtime-env <cluster/runtime_env.yaml's
        excludes> --working-dir . -- python jobs/finetune.py --config <tiny> <a few steps>

The job runs from the uploaded working dir (not this checkout), so a module that only imports from
the repo root, a config path that only resolves here, or a runtime env that uploads .venv fails.

The cluster is this test's own (jobs/local_ray.py, also what ``make demo`` uses): its own temp
dir, free ports for every server, every server on 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
makes Ray keep the loopback address instead of resolving 127.0.0.1 to the machine's IP, so the GCS
and raylet bind to loopback), token auth off (``RAY_AUTH_MODE=disabled``, a single-user local
cluster). ``ray start`` daemonizes, so it runs in a new session: every process the cluster starts
(GCS, raylet, dashboard, job drivers, workers) inherits that session id, and teardown signals
exactly those PIDs -- never ``ray stop``, which kills every Ray process on the machine by name.
Budget: ~2.5 minutes on 2 cores (start ~25 s, probe ~10 s, stage 2 ~65 s, stop ~10 s).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from jobs.local_ray import REPO, LocalRayCluster

JOB_TIMEOUT_S = 150
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}

# A hang must not eat the suite's budget; pytest-timeout's signal method fails the test in the
# main thread, so the cluster fixture's teardown still stops the cluster.
pytestmark = pytest.mark.timeout(330, method="signal")


def local_runtime_env(tmp: Path) -> Path:
    """cluster/runtime_env.yaml with its excludes as they are and env_vars for this machine.

    The cluster file's env_vars point at node volumes (/mnt/cache); here the caches are the venv's
    (DeepSpeed's JIT-built ops are reused, not rebuilt per test run). working_dir comes from
    ``--working-dir`` on the command line, as the README shows.
    """
    env = yaml.safe_load((REPO / "cluster/runtime_env.yaml").read_text())
    env.pop("working_dir", None)
    env["env_vars"] = {
        **{k: v for k, v in env.get("env_vars", {}).items() if not v.startswith("/mnt/")},
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".venv/torch_extensions")),
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    path = tmp / "runtime_env.yaml"
    path.write_text(yaml.safe_dump(env))
    return path


@pytest.fixture(scope="module")
def cluster():
    c = LocalRayCluster(num_cpus=4)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        assert not c.pids(), f"processes of the test cluster survived: {c.pids()}"


def submit_and_wait(cluster: LocalRayCluster, runtime_env: Path, entrypoint: list[str], job_id: str) -> dict:
    """`ray job submit --no-wait`, then poll the jobs API until a terminal state or the timeout."""
    r = cluster.cli("job", "submit", "--address", cluster.address, "--submission-id", job_id,
                    "--working-dir", str(REPO), "--runtime-env", str(runtime_env), "--no-wait",
                    "--", *entrypoint)
    assert r.returncode == 0, f"ray job submit failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    deadline = time.time() + JOB_TIMEOUT_S
    info = cluster.job_info(job_id)
    while info["status"] not in TERMINAL and time.time() < deadline:
        time.sleep(2)
        info = cluster.job_info(job_id)
    if info["status"] not in TERMINAL:
        cluster.cli("job", "stop", "--address", cluster.address, job_id, timeout=60)
    return info


def job_logs(cluster: LocalRayCluster, job_id: str) -> str:
    r = cluster.cli("job", "logs", "--address", cluster.address, job_id, timeout=60)
    return r.stdout + r.stderr


def test_job_submit_runs_from_uploaded_working_dir(cluster, tmp_path):
    """The entrypoint runs in the uploaded copy, with the runtime env's env_vars, and succeeds."""
    env = local_runtime_env(tmp_path)
    probe = ("import os, pathlib, sys; import training.config; "
             "print('CWD', os.getcwd()); print('MOD', training.config.__file__); "
             "print('VENV', pathlib.Path('.venv').exists()); print('TOK', os.environ.get('TOKENIZERS_PARALLELISM'))")
    info = submit_and_wait(cluster, env, ["python", "-c", probe], "probe")
    logs = job_logs(cluster, "probe")
    assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{logs[-4000:]}"
    assert f"CWD {REPO}" not in logs, "the job ran in the checkout, not the uploaded working dir"
    assert "VENV False" in logs, "the runtime env's excludes did not keep .venv out of the upload"
    assert "TOK false" in logs
    status = cluster.cli("job", "status", "--address", cluster.address, "probe")
    assert "succeeded" in (status.stdout + status.stderr).lower()


# ---- stage 2 through `ray job submit` -----------------------------------------------------------

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
BEEPS = {"one": 1, "two": 2, "three": 3}


def tiny_data(root: Path) -> Path:
    """Data for stage 2 in the layout jobs/synthesize.py + jobs/features.py write (dialogues/ and the
    features/ store under one root), plus a stage-1 export for ``model.init``.

    Built here in a few seconds, without Ray: running the real pipeline jobs through the cluster
    first would take ~2 minutes on 2 cores (measured: synthesize 49 s + features 61 s), and
    tests/test_pipelines.py covers them. The tensors come from the tiny preset's own frozen
    encoders, so the feature store holds what jobs/features.py would (same encoder names).
    """
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from helpers import image, tone
    from mmm.config import preset
    from mmm.media import media_id
    from mmm.model import MMMModel
    from mmm.schema import AUDIO, DIALOGUES, IMAGE, encode_tensor
    from pipelines.storage import StorageConfig
    from pipelines.store import FEATURES_DIR, FeatureStore

    model = MMMModel.build(preset("tiny")).eval()
    model.save_pretrained(str(root / "stage1/final"), phase="stage1")
    items = []  # (modality, answer, media_id, PIL image or 16 kHz wave)
    for name, rgb in COLOURS.items():
        buf = io.BytesIO()
        image(rgb).save(buf, format="PNG")
        items.append((IMAGE, name, media_id(buf.getvalue()), image(rgb)))
    for name, n in BEEPS.items():
        wave = tone(0.3 * n, hz=880.0)
        items.append((AUDIO, name, media_id(wave.tobytes()), wave))
    rows = []
    for modality, encoder in ((IMAGE, model.vision), (AUDIO, model.audio)):
        picked = [it for it in items if it[0] == modality]
        for (_, _, mid, _), feat in zip(picked, model.encode_media(modality, [it[3] for it in picked])):
            rows.append({"media_id": mid, "modality": modality, "encoder": encoder.name, **encode_tensor(feat.numpy())})
    FeatureStore(str(root / "data" / FEATURES_DIR), StorageConfig()).write_part(pa.Table.from_pylist(rows))
    question = {IMAGE: ("<image></image> What colour is the square?", "<image></image> Apakah warna segi empat itu?"),
                AUDIO: ("<audio></audio> How many beeps?", "<audio></audio> Berapa bunyi bip?")}
    dialogues = []
    for i, (modality, answer, mid, _) in enumerate(items * 3):
        lang = ("en", "ms")[i % 2]
        dialogues.append({
            "dialogue_id": f"d{i}", "kind": "visual_context" if modality == IMAGE else "audio_instruction",
            "lang": lang, "media_ids": [mid], "split": "train", "source": "test",
            "messages": [{"role": "user", "content": question[modality][i % 2]}, {"role": "assistant", "content": answer}],
        })
    (root / "data/dialogues").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(dialogues, schema=DIALOGUES), root / "data/dialogues/part-0.parquet")
    return root


def test_finetune_job_submitted_to_the_cluster_succeeds(cluster, tmp_path):
    """CI's cluster path: stage 2 (tiny preset, 3 steps, 2 Ray Train workers, DeepSpeed ZeRO-2)
    submitted with `ray job submit` reaches SUCCEEDED and exports a stage-2 checkpoint."""
    root = tiny_data(tmp_path)
    env = local_runtime_env(tmp_path)
    entry = ["python", "jobs/finetune.py", "--config", "cluster/configs/tiny-finetune.yaml", "--data", str(root / "data"),
             f"model.init={root}/stage1/final", f"run.output_dir={root}/stage2", f"run.storage_path={root}/ray_results",
             "run.name=ci-finetune"]
    start = time.time()
    info = submit_and_wait(cluster, env, entry, "finetune")
    logs = job_logs(cluster, "finetune")
    assert info["status"] == "SUCCEEDED", f"{info['status']} after {time.time() - start:.0f} s: {info.get('message')}\n{logs[-6000:]}"
    from mmm.checkpoint import META

    meta = json.loads((root / "stage2/final" / META).read_text())
    assert meta["phase"] == "stage2"
    ckpts = [p.name for p in (root / "ray_results/ci-finetune").glob("checkpoint_*")]
    assert ckpts, "no Ray Train checkpoint in run.storage_path"
