"""Shared fixtures. Tests never touch a model hub: HF offline mode is forced before any import."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray reads this when first imported: a local ray.init then binds loopback only (pipelines/runtime.py).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny preset, built once per test session (random weights, seconds to build)."""
    from mmm.config import preset
    from mmm.model import MMMModel

    return MMMModel.build(preset("tiny")).eval()


@pytest.fixture
def s3():
    """A local S3 (moto) on 127.0.0.1 with bucket ``mmm-test``; yields the StorageConfig that reaches it."""
    import boto3  # moto's own dependency; s3fs would send a LocationConstraint moto refuses for us-east-1
    from moto.server import ThreadedMotoServer

    from pipelines.storage import StorageConfig

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    storage = StorageConfig(endpoint_url=f"http://{host}:{port}", key="testing", secret="testing")
    boto3.client("s3", endpoint_url=storage.endpoint_url, aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket="mmm-test")
    yield storage
    server.stop()


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A local Ray for one test module, its temp folder under pytest's, shut down after the module."""
    import ray

    from pipelines.runtime import start_local_ray

    start_local_ray(num_cpus=4, include_dashboard=False, _temp_dir=str(tmp_path_factory.mktemp("ray")), log_to_driver=False)
    yield
    ray.shutdown()
