"""Static checks of the cluster configs (cluster/, serve/*.yaml): they parse, name things that exist,
and agree with each other and with the code. No cluster is started (tests/test_cluster_submit.py
does that); the whole file takes a few seconds.

- every YAML under cluster/ and serve/ parses (``yaml.safe_load_all``);
- every ``python jobs/X.py`` and ``cluster/configs/Y.yaml`` a file names (comments included) exists;
- job configs load into the jobs' typed configs, and the real presets keep the paper's settings;
- the launcher YAML passes Ray's own cluster schema; torch is installed pinned, before the project;
- KubeRay manifests: ``ray.io/v1`` kinds, string rayStartParams, GPU limits that match num-gpus,
  one image everywhere, the cache volume the runtime env points at, the RayJob entrypoint and
  runtimeEnvYAML, the RayService serveConfigV2 (Ray's Serve schema, the app builder's arguments,
  deployments that exist in serve/app.py, a GPU for the model).
"""

from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
YAMLS = sorted(p for d in (CLUSTER, REPO / "serve") for p in d.rglob("*.y*ml"))
KUBERAY = {"raycluster.yaml": "RayCluster", "rayjob-finetune.yaml": "RayJob", "rayservice.yaml": "RayService"}
CONFIGS = sorted((CLUSTER / "configs").glob("*.yaml"))
REAL_PRESETS = ("tinyllama", "mistral")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# ---- every file -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", YAMLS, ids=rel)
def test_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{rel(path)} is empty"


@pytest.mark.parametrize("path", YAMLS + [CLUSTER / "Dockerfile"], ids=rel)
def test_named_scripts_and_configs_exist(path):
    """`python jobs/x.py` and `cluster/configs/y.yaml` in a file (comments too) must exist in the repo."""
    text = path.read_text()
    named = set(re.findall(r"\b(jobs/[\w/]+\.py)\b", text)) | set(re.findall(r"\b(cluster/[\w/.-]+\.ya?ml)\b", text))
    missing = sorted(n for n in named if not (REPO / n).exists())
    assert not missing, f"{rel(path)} names files that do not exist: {missing}"


# ---- job configs ------------------------------------------------------------------------------


def parse_pipeline_config(cls: type, path: Path):
    """What jobs/features.py and jobs/synthesize.py do with ``--config``; their errors exit(2)."""
    from pipelines.cli import parse

    try:
        return parse(cls, ["--config", str(path)], None)
    except SystemExit as e:
        raise AssertionError(f"{rel(path)} does not load into {cls.__name__} (see stderr)") from e


@pytest.fixture
def train_configs(monkeypatch):
    """``load(stage, path)`` -> TrainConfig exactly as jobs/pretrain.py / jobs/finetune.py build it
    (``training.stages.job_config``: defaults < job defaults < YAML), without reading ``model.init``
    from S3 to learn its preset (no network in tests; the run folders name it)."""
    from training import stages

    def offline(path, s3_endpoint=None):
        preset = next((p for p in REAL_PRESETS if f"/{p}/" in path), "tiny")  # run folders name their preset
        return stages.InitCheckpoint(path, "stage1", preset)

    monkeypatch.setattr(stages.InitCheckpoint, "read", staticmethod(offline))
    return lambda stage, path: stages.job_config(stage, "outputs/data", str(path), [])[0]


def load_job_config(path: Path, train_configs):
    """The typed config the job that this file is for builds from it (by file-name prefix)."""
    name = path.stem
    if name.startswith(("pretrain-", "finetune-", "tiny-pretrain", "tiny-finetune")):
        return train_configs("pretrain" if "pretrain" in name else "finetune", path)
    if name.startswith(("features-", "tiny-features")):
        from pipelines.features import FeaturesConfig

        return parse_pipeline_config(FeaturesConfig, path)
    if name.startswith(("synthesize-", "tiny-synthesize")):
        from pipelines.synth.generate import SynthesizeConfig

        return parse_pipeline_config(SynthesizeConfig, path)
    raise AssertionError(f"{rel(path)}: no job claims this config (name it <job>-<preset>.yaml)")


@pytest.mark.parametrize("path", CONFIGS, ids=rel)
def test_job_config_loads_into_typed_config(path, train_configs):
    assert load_job_config(path, train_configs) is not None


@pytest.mark.parametrize("preset", REAL_PRESETS)
def test_real_presets_keep_the_papers_settings(preset, train_configs):
    from training.stages import FINAL

    stage1 = train_configs("pretrain", CLUSTER / f"configs/pretrain-{preset}.yaml")
    stage2 = train_configs("finetune", CLUSTER / f"configs/finetune-{preset}.yaml")
    assert stage1.model.preset == stage2.model.preset == preset
    assert stage1.llm == "frozen", "stage 1 trains the projectors only"
    assert stage2.llm == "full"
    t = stage2.train
    positions = {"tinyllama": 2048, "mistral": 8192}[preset]  # the paper's 8192, bounded by the LM's positions
    assert (stage2.global_batch, t.lr, t.schedule, t.context_length) == (12, 2e-5, "constant", positions)
    assert stage2.deepspeed.zero_stage == 2 and stage2.deepspeed.bf16 is True
    for cfg in (stage1, stage2):
        assert cfg.resources.use_gpu
        assert cfg.run.storage_path.startswith("s3://") and cfg.run.output_dir.startswith("s3://")
    # Stage 2 starts from what stage 1 exports (training/stages.py: <output_dir>/final), and reads the
    # same data root.
    assert stage2.model.init == f"{stage1.run.output_dir}/{FINAL}"
    assert stage1.data.features == stage2.data.features


# ---- cluster launcher -------------------------------------------------------------------------


def test_launcher_passes_rays_cluster_schema():
    import jsonschema

    schema = json.loads((Path(ray.__file__).parent / "autoscaler/ray-schema.json").read_text())
    cfg = load(CLUSTER / "launcher.yaml")
    jsonschema.validate(cfg, schema)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu = [n for n, t in types.items() if t.get("resources", {}).get("GPU", 0) > 0]
    cpu = [n for n, t in types.items() if n != cfg["head_node_type"] and not t.get("resources", {}).get("GPU")]
    assert gpu and cpu, f"want GPU workers (encoders, training) and CPU workers (synthesis): {list(types)}"
    for name, t in types.items():
        if name != cfg["head_node_type"]:
            assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"], name
    assert ray.__version__ in cfg["docker"]["image"], "nodes must run the Ray version the project is tested on"


def test_launcher_installs_pinned_torch_before_the_project():
    cfg = load(CLUSTER / "launcher.yaml")
    cmds = cfg["setup_commands"]
    torch_at = next(i for i, c in enumerate(cmds) if re.search(r"pip install\b.*\btorch==\d", c))
    project_at = next(i for i, c in enumerate(cmds) if re.search(r"pip install\b.*-e /home/ray/mmm", c))
    assert torch_at < project_at
    assert not any("torchvision" in c for c in cmds)
    for remote, local in cfg["file_mounts"].items():
        assert (REPO / local).exists(), f"file_mounts {remote}: {local} missing"
    assert ".venv" in cfg["rsync_exclude"] and "outputs" in cfg["rsync_exclude"]


# ---- runtime env ------------------------------------------------------------------------------


def test_runtime_env_is_valid_and_small():
    from ray.runtime_env import RuntimeEnv

    env = load(CLUSTER / "runtime_env.yaml")
    RuntimeEnv(**env)  # Ray's own validation: types of env_vars, excludes, ...
    assert env["working_dir"] == "."
    assert {".venv/", "outputs/", ".git/"} <= set(env["excludes"])
    assert not {"pip", "uv", "conda"} & set(env), "dependencies come from the node image, not per job"
    assert "RAY_AUTH_MODE" not in env["env_vars"], "auth mode is a cluster setting, not a job's"
    assert env["env_vars"]["HF_HOME"].startswith("/mnt/cache/")


# ---- KubeRay ----------------------------------------------------------------------------------


def kuberay(name: str) -> dict:
    return load(CLUSTER / "kuberay" / name)


def cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return {"RayCluster": lambda: spec, "RayJob": lambda: spec["rayClusterSpec"],
            "RayService": lambda: spec["rayClusterConfig"]}[doc["kind"]]()


def groups(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def test_kuberay_manifests_apply_side_by_side_in_one_namespace():
    """KubeRay names a cluster's Services after its resource: ``NAME-head-svc`` for a RayCluster
    and a RayService, ``NAME-serve-svc`` for a RayService (a RayJob's cluster gets a generated
    suffix). Two resources of one name would fight over one Service."""
    services = []
    for file in KUBERAY:
        doc = kuberay(file)
        name = doc["metadata"]["name"]
        services += {"RayCluster": [f"{name}-head-svc"], "RayService": [f"{name}-head-svc", f"{name}-serve-svc"],
                     "RayJob": []}[doc["kind"]]
    assert len(services) == len(set(services)), services
    for file in KUBERAY:  # each manifest's own port-forward line names a Service it creates
        for svc in re.findall(r"port-forward svc/([\w-]+)", (CLUSTER / "kuberay" / file).read_text()):
            assert svc in services, (file, svc)


@pytest.mark.parametrize("name", sorted(KUBERAY))
def test_kuberay_kind_version_and_groups(name):
    doc = kuberay(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == KUBERAY[name]
    spec = cluster_spec(doc)
    assert spec["rayVersion"] == ray.__version__
    assert spec.get("authOptions", {}).get("mode") == "token", "clusters keep Ray's token auth on"
    for group, g in groups(spec):
        params = g["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), f"{group}: rayStartParams values must be strings"
        if group != "head":
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], group
        (container,) = [c for c in g["template"]["spec"]["containers"] if c["name"].startswith("ray-")]
        res = container["resources"]
        gpus = res["limits"].get("nvidia.com/gpu")
        assert res["requests"].get("nvidia.com/gpu") == gpus, f"{group}: GPU requests must equal limits"
        assert params.get("num-gpus") == gpus, f"{group}: num-gpus {params.get('num-gpus')} vs limit {gpus}"
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        assert "/mnt/cache" in mounts, f"{group}: HF_HOME / TORCH_EXTENSIONS_DIR live under /mnt/cache"


def test_kuberay_has_gpu_workers_and_one_image():
    images = set()
    for name in KUBERAY:
        spec = cluster_spec(kuberay(name))
        gpu_groups = [n for n, g in groups(spec) if g["rayStartParams"].get("num-gpus")]
        assert gpu_groups, f"{name}: no GPU worker group"
        for _, g in groups(spec):
            images |= {c["image"] for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1, f"every pod should run the project image (cluster/Dockerfile): {images}"
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-", dockerfile, re.M)


def test_rayjob_runs_stage2_with_the_cluster_runtime_env(train_configs):
    doc = kuberay("rayjob-finetune.yaml")
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/finetune.py"] and (REPO / argv[1]).exists()
    config = argv[argv.index("--config") + 1]
    cfg = train_configs("finetune", REPO / config)
    assert cfg.resources.use_gpu
    gpus = sum(int(g["rayStartParams"].get("num-gpus", 0)) * g.get("replicas", 1) for _, g in groups(cluster_spec(doc)))
    assert cfg.resources.num_workers <= gpus, f"{cfg.resources.num_workers} workers, {gpus} GPUs"
    job_env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    base = load(CLUSTER / "runtime_env.yaml")
    assert job_env["env_vars"] == base["env_vars"] and job_env["excludes"] == base["excludes"]
    assert f"COPY --chown=ray:users . {job_env['working_dir']}" in (CLUSTER / "Dockerfile").read_text()


def serve_app() -> dict:
    doc = kuberay("rayservice.yaml")
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    return app


def top_level_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def test_rayservice_serves_what_stage2_exports(train_configs):
    from training.stages import FINAL

    stage2 = train_configs("finetune", CLUSTER / "configs/finetune-mistral.yaml")
    assert serve_app()["args"]["checkpoint"] == f"{stage2.run.output_dir}/{FINAL}"


def test_rayservice_serve_config_matches_the_app():
    from ray.serve.schema import ServeDeploySchema

    doc = kuberay("rayservice.yaml")
    ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    app = serve_app()
    module, _, attr = app["import_path"].partition(":")
    source = REPO / (module.replace(".", "/") + ".py")
    names = top_level_names(source)
    assert attr in {"build", "mmm"} and attr in names, f"{app['import_path']}: no {attr!r} in {rel(source)}"
    if attr == "build":
        from serve.config import ServeArgs

        args = ServeArgs.model_validate(app["args"])  # a misspelt argument is an error (extra=forbid)
        assert args.use_gpu is True, "the head pod builds the app and has no GPU: say use_gpu explicitly"
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) <= names, f"deployments not in {rel(source)}: {set(deployments) - names}"
    model = deployments["ChatModel"]
    assert model["ray_actor_options"]["num_gpus"] >= 1
    for d in deployments.values():
        a = d["autoscaling_config"]
        assert 1 <= a["min_replicas"] <= a["max_replicas"]


def test_rayservice_matches_serve_deploy_yaml():
    """serve/deploy.yaml (`serve deploy` on a VM cluster) and the RayService serve the same app."""
    path = REPO / "serve/deploy.yaml"
    if not path.exists():
        pytest.fail("serve/deploy.yaml is missing (the serving part's `serve build` output)")
    (deploy,) = [a for a in load(path)["applications"] if a.get("name") == serve_app()["name"]] or [None]
    assert deploy is not None, f"serve/deploy.yaml has no application named {serve_app()['name']!r}"
    ours = serve_app()
    assert deploy["import_path"] in {"serve.app:build", "serve.app:mmm"}
    assert deploy.get("route_prefix", "/") == ours["route_prefix"]
    theirs = {d["name"]: d for d in deploy.get("deployments", [])}
    mine = {d["name"]: d for d in ours["deployments"]}
    assert set(theirs) == set(mine)
    for name, d in theirs.items():
        for key in ("max_ongoing_requests", "autoscaling_config", "ray_actor_options"):
            assert mine[name].get(key) == d.get(key), f"{name}.{key}: rayservice {mine[name].get(key)} vs deploy.yaml {d.get(key)}"
