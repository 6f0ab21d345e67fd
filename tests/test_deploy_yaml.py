"""serve/deploy.yaml and the RayService serve a checkpoint given as an argument: the typed app
builder (``serve.app:build``) with ``args: checkpoint: ...``, which the builder hands to the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def deploy_app() -> dict:
    (app,) = [a for a in yaml.safe_load((REPO / "serve/deploy.yaml").read_text())["applications"] if a["name"] == "mmm"]
    return app


def rayservice_app() -> dict:
    doc = yaml.safe_load((REPO / "cluster/kuberay/rayservice.yaml").read_text())
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    return app


@pytest.mark.parametrize("load", [deploy_app, rayservice_app], ids=["serve/deploy.yaml", "rayservice.yaml"])
def test_the_checkpoint_argument_reaches_the_builder(load, monkeypatch):
    from ray.serve.schema import ServeApplicationSchema

    import serve.app
    from serve.config import ServeArgs

    app = load()
    ServeApplicationSchema.model_validate(app)  # Ray's own schema of an application entry
    assert app["import_path"] == "serve.app:build", "serve.app:mmm takes no arguments: it would serve no checkpoint"
    checkpoint = app["args"]["checkpoint"]
    assert checkpoint.startswith("s3://") and checkpoint.endswith("/final")
    seen = []

    def spy(given, search_dir):
        seen.append(given)
        return given

    monkeypatch.setattr(serve.app, "resolve_checkpoint", spy)
    # What `serve deploy` does with `args`: validate them as the builder's annotated type, then call it.
    built = serve.app.build(ServeArgs.model_validate(app["args"]))
    assert seen == [checkpoint] and built is not None
