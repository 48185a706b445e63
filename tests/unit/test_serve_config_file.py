"""The Serve config file (`serve deploy` / `serve run configs/serve/serve_app.yaml`) is valid for
Ray Serve's own schema, and its import path builds our application from its args."""

from __future__ import annotations

import importlib

import yaml
from ray.serve.schema import ServeDeploySchema

from configs.schema import ServeConfig, load_config
from tests.conftest import REPO

SERVE_FILE = REPO / "configs" / "serve" / "serve_app.yaml"


def test_serve_config_file_matches_serves_schema_and_builds_the_app() -> None:
    document = yaml.safe_load(SERVE_FILE.read_text())
    schema = ServeDeploySchema.model_validate(document)
    [app] = schema.applications
    assert app.route_prefix == "/"
    module_name, attribute = app.import_path.split(":")
    builder = getattr(importlib.import_module(module_name), attribute)
    config_path = REPO / app.args["config"]
    config = load_config(config_path, ServeConfig)
    assert document["http_options"]["port"] == config.port
    application = builder(app.args)
    assert type(application).__name__ == "Application"
