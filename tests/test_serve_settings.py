"""The server's settings and app builder, checked without starting anything: every flag of
`hogwild-ray serve` and every argument of `serve run hogwild_ray.serve.app:app_builder`."""

from __future__ import annotations

import pytest

from hogwild_ray.errors import InvalidRequestError
from hogwild_ray.serve.app import DEFAULT_MODEL_NAME, ServeSettings, app_builder, parse_autoscale

pytest.importorskip("ray.serve")


def deployments(app) -> dict:
    """name -> deployment of a built application (the front, and the engine it binds)."""
    front = app._bound_deployment
    engine = front.init_args[0]._bound_deployment if hasattr(front.init_args[0], "_bound_deployment") else None
    return {d.name: d for d in (front, engine) if d is not None}


def test_app_builder_turns_serve_run_arguments_into_settings():
    app = app_builder({"workers": "3", "max_tokens": "64", "autoscale": "1,4", "served_model_name": "m",
                       "cuda_graphs": "false", "max_waiting": "7", "graph_warmup": "5"})
    d = deployments(app)
    engine = d["HogwildEngine"]
    assert engine.init_args[4] == (3, 5)  # decode graphs warmed up for up to 5 sessions of 3 workers
    assert engine._deployment_config.autoscaling_config.min_replicas == 1
    assert engine._deployment_config.autoscaling_config.max_replicas == 4
    assert engine.init_args[0]["cuda_graphs"] is False
    defaults, key, waiting = d["OpenAIFront"].init_args[1:]
    assert (defaults.model, defaults.workers, defaults.max_tokens, waiting) == ("m", 3, 64, 7)
    sharded = deployments(app_builder({"tp": "2", "device": "cuda"}))["HogwildEngine"]
    assert sharded.ray_actor_options["num_gpus"] == 0  # the shards hold the GPUs, not the replica
    assert (sharded.init_args[0]["backend"], sharded.init_args[0]["tp"]) == ("ray", 2)
    fixed = deployments(app_builder({"replicas": 2}))["HogwildEngine"]
    assert fixed.num_replicas == 2 and fixed._deployment_config.autoscaling_config is None


@pytest.mark.parametrize("args, words", [
    ({"wokers": "3"}, "unknown argument(s) wokers"),
    ({"workers": "three"}, "workers='three' is not a valid value"),
    ({"workers": "0"}, "workers must be an integer >= 1"),
    ({"autoscale": "4"}, "give MIN,MAX"),
    ({"autoscale": "3,1"}, "autoscale maximum must be an integer >= 3"),
    ({"tp": "0"}, "tp must be an integer >= 1"),
    ({"max_workers": "1", "workers": "2"}, "max_workers must be an integer >= 2"),
    ({"api_key": " "}, "--api-key is empty"),
    ({"cuda_graphs": "maybe"}, "cuda_graphs='maybe'"),
    ({"graph_warmup": "-1"}, "graph_warmup must be an integer >= 0 (0 captures the graphs as requests come)"),
])
def test_bad_arguments_are_refused_by_name(args, words):
    with pytest.raises(InvalidRequestError) as err:
        app_builder(args)
    assert words in str(err.value)


def test_the_served_name_and_the_api_key_from_the_environment(monkeypatch):
    assert ServeSettings().model_name == DEFAULT_MODEL_NAME
    assert ServeSettings(model="/models/Qwen3-8B").model_name == "/models/Qwen3-8B"
    monkeypatch.setenv("HOGWILD_API_KEY", "sk-env")
    front = deployments(app_builder({}))["OpenAIFront"]
    assert front.init_args[2] == "sk-env"
    assert parse_autoscale("0,3") == (0, 3)
    assert deployments(app_builder({}))["HogwildEngine"].init_args[4] == (2, 32)  # the default warm-up


def test_the_serve_command_gives_its_flags_to_the_settings():
    from hogwild_ray.cli import build_parser
    from hogwild_ray.cli.serve import settings_from

    args = build_parser().parse_args(["serve", "--workers", "3", "--graph-warmup", "6", "--max-waiting", "9"])
    settings = settings_from(args)
    assert (settings.workers, settings.graph_warmup, settings.max_waiting) == (3, 6, 9)
    assert settings_from(build_parser().parse_args(["serve"])).graph_warmup == 32
