"""A checkpoint on S3 loads through the configured storage (endpoint and keys), not s3fs's defaults:
``MMMModel.from_pretrained(..., storage_options=...)``, and serve's engine passes them on."""

from __future__ import annotations

import pytest
import torch

from mmm.checkpoint import CheckpointError
from mmm.config import preset
from mmm.model import MMMModel


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[MMMModel, str]:
    model = MMMModel.build(preset("tiny"))
    path = tmp_path_factory.mktemp("ckpt") / "stage1"
    model.save_pretrained(str(path), phase="stage1")
    return model, str(path)


def test_s3_checkpoint_loads_with_storage_options(saved, s3):
    model, local = saved
    fs, _ = s3.filesystem("s3://mmm-test/run/final")
    fs.put(local + "/", "mmm-test/run/final", recursive=True)
    options = s3.storage_options()
    assert options["client_kwargs"]["endpoint_url"] == s3.endpoint_url and options["key"] == "testing"
    loaded = MMMModel.from_pretrained("s3://mmm-test/run/final", expect_phase="stage1", storage_options=options)
    assert loaded.phase == "stage1" and (loaded.vision.name, loaded.audio.name) == (model.vision.name, model.audio.name)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(CheckpointError, match="not an MMM checkpoint"):
        MMMModel.from_pretrained("s3://mmm-test/run/nothing-here", storage_options=options)

    from serve.engine import load_engine

    engine = load_engine("s3://mmm-test/run/final", "tiny", None, "cpu", storage_options=options)
    assert engine.model_id == "mmm-tiny-stage1"
