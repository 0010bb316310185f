"""The serve config: strict keys (Ray itself accepts misspelled autoscaling keys), values checked with
their dotted key, and a deploy config whose live keys really are live (same Ray code version).
No cluster is started here."""

from __future__ import annotations

import argparse
import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

from llamapro.config import ConfigError
from llamapro.serve import (
    load_serve_config,
    serve_config_from_dict,
    serve_deploy_config,
)

REPO = Path(__file__).resolve().parents[2]
TWO = {"models": {"base": {"path": "/m/base"}, "expanded": {"path": "/m/exp"}}}


def cfg(**kw):
    return serve_config_from_dict({**TWO, **kw})


@pytest.mark.parametrize("section, key", [
    ({"autoscaling": {"target_ongoing_requets": 2}}, "serve.autoscaling.target_ongoing_requets"),
    ({"models": {"base": {"path": "/m", "autoscaling": {"max_replica": 2}}}},
     "serve.models.base.autoscaling.max_replica"),
    ({"models": {"base": {"path": "/m", "max_batch": 4}}}, "serve.models.base.max_batch"),
    ({"canary": {"weight": {"base": 1}}}, "serve.canary.weight"),
    ({"limits": {"max_token": 5}}, "serve.limits.max_token"),
    ({"api_key": "sk-123"}, "serve.api_key"),
])
def test_unknown_keys_are_rejected_by_name(section, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        serve_config_from_dict(section)


def test_ray_itself_accepts_the_misspelled_key():
    # why llamapro checks: Ray's own autoscaling schema ignores an unknown key
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig(min_replicas=1, max_replicas=2, target_ongoing_requets=9)


@pytest.mark.parametrize("section, key", [
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "serve.autoscaling.max_replicas"),
    ({"models": {"base": {"path": "/m", "autoscaling": {"upscale_delay_s": -1}}}},
     "serve.models.base.autoscaling.upscale_delay_s"),
    ({"models": {"base": {"path": "/m", "autoscaling": {"target_ongoing_requests": 0}}}},
     "serve.models.base.autoscaling.target_ongoing_requests"),
    ({"models": {"base": {"path": "/m", "engine": "tgi"}}}, "serve.models.base.engine"),
    ({"models": {"base": {"path": "/m", "max_batch_size": 8, "max_ongoing_requests": 4}}},
     "serve.models.base.max_ongoing_requests"),
    ({"models": {"base": {}}}, "serve.models.base.path"),
    ({**TWO, "canary": {"weights": {"base": -1}}}, "serve.canary.weights.base"),
    ({**TWO, "canary": {"weights": {"nope": 1}}}, "serve.canary.weights"),
    ({"limits": {"max_tokens": 10, "default_max_tokens": 20}}, "serve.limits.default_max_tokens"),
    ({"api_key_env": "sk-live-abc123!"}, "serve.api_key_env"),
    ({"models": {"llamapro": {"path": "/m"}}}, "serve.models.llamapro"),
    ({"port": 0}, "serve.port"),
])
def test_bad_values_name_their_key(section, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        serve_config_from_dict(section)


def test_per_model_autoscaling_overrides_the_default_key_by_key():
    c = cfg(autoscaling={"max_replicas": 3, "upscale_delay_s": 5},
            models={"base": {"path": "/m", "autoscaling": {"max_replicas": 2}}, "x": "/m/x"})
    assert c.autoscaling_of("base").max_replicas == 2
    assert c.autoscaling_of("base").upscale_delay_s == 5
    assert c.autoscaling_of("x").max_replicas == 3  # `x: /path` shorthand
    assert c.weights() == {"base": 1.0, "x": 0.0}  # no weights: all to the first model


def _code_version(c):
    from ray.serve._private.deploy_utils import get_app_code_version
    from ray.serve.schema import ServeDeploySchema

    return get_app_code_version(ServeDeploySchema.model_validate(serve_deploy_config(c))
                                .applications[0])


def test_live_keys_do_not_change_the_code_version():
    """Ray rebuilds (restarts every replica) when an app's code version changes; weights, limits,
    autoscaling and batch sizes must not change it, so a switch is an in-place update."""
    a = cfg(canary={"weights": {"base": 0.9, "expanded": 0.1}})
    b = serve_config_from_dict({
        "models": {"base": {"path": "/m/base", "max_batch_size": 16},
                   "expanded": {"path": "/m/exp", "autoscaling": {"max_replicas": 4}}},
        "canary": {"weights": {"expanded": 1}, "seed": 3}, "limits": {"max_tokens": 99},
        "autoscaling": {"upscale_delay_s": 1}, "ingress": {"num_replicas": 2}})
    assert _code_version(a) == _code_version(b)
    c = serve_config_from_dict({"models": {"base": {"path": "/m/other"},
                                           "expanded": {"path": "/m/exp"}}})
    assert _code_version(a) != _code_version(c)
    ing = serve_deploy_config(b)["applications"][0]["deployments"][0]
    assert ing["user_config"]["weights"] == {"base": 0.0, "expanded": 1.0}


def test_build_app_from_its_own_args():
    from llamapro.serve import build_app, static_args

    c = cfg(canary={"weights": {"expanded": 1}}, api_key_env="LLAMAPRO_TEST_KEY",
            models={"base": {"path": "/m/base", "num_cpus": 2},
                    "expanded": {"path": "/m/exp"}})
    app = build_app(static_args(c))  # what the controller calls for `serve deploy`
    ingress = app._bound_deployment
    assert ingress.name == "ingress"
    spec, handles = ingress.init_args
    assert spec == {"alias": "llamapro", "api_key_env": "LLAMAPRO_TEST_KEY", "api_key_file": "",
                    "models": ["base", "expanded"],
                    "routes": {"base": ["base", ""], "expanded": ["expanded", ""]}}
    assert {n: h._bound_deployment.name for n, h in handles.items()} == {
        "base": "model-base", "expanded": "model-expanded"}
    base = handles["base"]._bound_deployment
    assert base.init_args[0]["path"] == "/m/base" and base.ray_actor_options["num_cpus"] == 2
    # bounded queues with Retry-After by default, at both levels
    assert (base.max_ongoing_requests, base.max_queued_requests) == (16, 32)  # 2 x batch of 8
    assert base.backpressure_config.retry_after_s == 2.0
    assert ingress.max_queued_requests == 256 and ingress.backpressure_config.status_code == 503
    with pytest.raises(ConfigError, match="unknown key"):
        build_app({"confg": "x.yaml"})


def test_demo_config_loads_and_other_sections_stay_strict(tmp_path):
    c = load_serve_config(REPO / "jobs/configs/serve_demo.yaml")
    assert set(c.models) == {"base", "expanded"}
    assert c.weights() == pytest.approx({"base": 0.9, "expanded": 0.1})
    c = load_serve_config(REPO / "jobs/configs/serve_demo.yaml",
                          ["serve.canary.weights.expanded=0.5", "serve.canary.weights.base=0.5"])
    assert c.weights() == {"base": 0.5, "expanded": 0.5}
    bad = tmp_path / "bad.yaml"
    bad.write_text("serv:\n  port: 1\n")
    with pytest.raises(ConfigError, match="serv"):
        load_serve_config(bad)


def _cli(*argv):
    from llamapro.cli.serve import add_serve_commands

    p = argparse.ArgumentParser()
    add_serve_commands(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["serve", *argv])
    out = io.StringIO()
    with redirect_stdout(out):
        assert a.fn(a) == 0
    return out.getvalue()


def test_print_serve_config_is_a_valid_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    text = _cli("--config", str(REPO / "jobs/configs/serve_demo.yaml"), "--print-serve-config")
    conf = yaml.safe_load(text)
    ServeDeploySchema.model_validate(conf)
    app = conf["applications"][0]
    assert app["import_path"] == "llamapro.serve:build_app"
    names = [d["name"] for d in app["deployments"]]
    assert names == ["ingress", "model-base", "model-expanded"]
    kube = yaml.safe_load(_cli("--config", str(REPO / "jobs/configs/serve_demo.yaml"),
                               "--print-serve-config", "--format", "kuberay"))
    assert yaml.safe_load(kube["spec"]["serveConfigV2"]) == conf


def test_secret_env_vars_never_reach_the_app_config(monkeypatch):
    """A Ray job's runtime env goes into the app config (`serve status`, the dashboard): the API key
    variable and any secret-looking one are dropped; a deploy whose config would still hold the
    key is refused."""
    from llamapro.serve import job_runtime_env, strip_secrets  # noqa: F401  (job_runtime_env: API)

    c = cfg(api_key_env="LLAMAPRO_API_KEY")
    env = {"working_dir": "https://x/y.zip", "env_vars": {
        "LLAMAPRO_API_KEY": "sk-1", "HF_TOKEN": "hf_x", "DB_PASSWORD": "p", "OMP_NUM_THREADS": "2"}}
    conf = serve_deploy_config(c, env)
    text = yaml.safe_dump(conf)
    assert conf["applications"][0]["runtime_env"] == {
        "working_dir": "https://x/y.zip", "env_vars": {"OMP_NUM_THREADS": "2"}}
    assert not any(s in text for s in ("sk-1", "hf_x", "DB_PASSWORD"))
    assert strip_secrets({"env_vars": {"LLAMAPRO_API_KEY": "sk-1"}}, c) is None


def test_the_key_itself_never_appears(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAPRO_TEST_KEY", "sk-secret-value")
    y = tmp_path / "c.yaml"
    y.write_text("serve:\n  api_key_env: LLAMAPRO_TEST_KEY\n  models: {base: /m}\n")
    text = _cli("--config", str(y), "--print-serve-config")
    assert "sk-secret-value" not in text and "LLAMAPRO_TEST_KEY" in text
