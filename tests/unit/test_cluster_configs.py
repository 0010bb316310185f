"""cluster.yaml against Ray's own schema and validator; KubeRay manifests against the CRDs; the
RayService's serveConfigV2 against the generator that wrote it and Ray Serve's schema."""

import copy
import gzip
import json
import os
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _ray_schema():
    import ray

    return json.loads((Path(os.path.dirname(ray.__file__)) / "autoscaler" / "ray-schema.json").read_text())


def test_cluster_yaml_is_valid_for_the_ray_cluster_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(cfg, _ray_schema())
    validate_config(prepare_config(copy.deepcopy(cfg)))
    types = cfg["available_node_types"]
    gpu = [t for t, v in types.items() if t != cfg["head_node_type"]]
    assert gpu and all(types[t]["max_workers"] >= 1 for t in gpu)
    assert any("pip install" in c and "-e ." in c for c in cfg["setup_commands"])


def test_cluster_yaml_keeps_token_auth_on():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert any(k.endswith("/.ray/auth_token") for k in cfg["file_mounts"])  # one token, every node
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        assert "ray start" not in cmd or "RAY_AUTH_MODE=token ray start" in cmd


def test_cluster_yaml_typo_is_rejected():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cfg["max_wrokers"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, _ray_schema())


def _strict(schema):
    """Like `kubectl apply --validate=strict`: unknown fields are errors (structural schemas
    would silently prune them)."""
    s = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    # metadata is validated by the API server, not the CRD
    s["properties"]["metadata"] = {"type": "object"}
    return s


def _crd(kind):
    d = json.load(gzip.open(ROOT / "cluster" / "crds" / f"ray.io_{kind}.schema.json.gz", "rt"))
    assert d["kuberay_commit"]  # the vendored version is recorded
    return _strict(d["versions"]["v1"])


@pytest.mark.parametrize("path,kind", [("raycluster.yaml", "rayclusters"), ("rayjob.yaml", "rayjobs"),
                                       ("rayservice.yaml", "rayservices")])
def test_kuberay_manifests_match_the_crds(path, kind):
    doc = yaml.safe_load((ROOT / "cluster" / path).read_text())
    jsonschema.validate(doc, _crd(kind))
    bad = copy.deepcopy(doc)
    bad["spec"]["shutdownAfterJobFinish" if kind == "rayjobs" else "enableInTreeAutoscalling"] = True
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _crd(kind))


def _cluster_spec(doc):
    return doc["spec"].get("rayClusterConfig") or doc["spec"].get("rayClusterSpec") or doc["spec"]


def _containers(doc):
    spec = _cluster_spec(doc)
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.mark.parametrize("path", ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml"])
def test_kuberay_manifests_keep_token_auth_on(path):
    """KubeRay's authOptions (not hand-written env vars): the operator then injects the token into
    every Ray container and authenticates its own calls (job submission, serve deploys)."""
    doc = yaml.safe_load((ROOT / "cluster" / path).read_text())
    auth = _cluster_spec(doc)["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"] == "llamapro-ray-token"
    assert "auth_token=" in (ROOT / "cluster" / path).read_text()  # how to create the Secret


# --- RayService: serveConfigV2 is the serve app's own generated config --------------------------

def _generator_command(text: str) -> list[str]:
    """The `llamapro serve ... --print-serve-config --format kuberay` command in the header."""
    m = re.search(r"^#\s+(llamapro serve .*?--print-serve-config.*?)(?<!\\)$", text, re.M | re.S)
    assert m, "the manifest names the command that generated serveConfigV2"
    cmd = re.sub(r"\\\n#\s*", " ", m.group(1))
    return shlex.split(cmd)


def test_rayservice_serve_config_is_what_the_generator_prints(capsys):
    from llamapro.cli import main

    text = (ROOT / "cluster" / "rayservice.yaml").read_text()
    argv = _generator_command(text)
    assert argv[:2] == ["llamapro", "serve"] and "kuberay" in argv
    cwd = os.getcwd()
    os.chdir(ROOT)  # the command's paths are relative to the repository
    try:
        assert main(argv[1:]) == 0
    finally:
        os.chdir(cwd)
    generated = yaml.safe_load(capsys.readouterr().out)["spec"]["serveConfigV2"]
    shipped = yaml.safe_load(text)["spec"]["serveConfigV2"]
    assert shipped == generated, ("cluster/rayservice.yaml is stale: paste the output of\n  "
                                  + " ".join(argv) + "\nunder spec:")


def test_rayservice_serve_config_matches_the_shipped_serve_config():
    from llamapro.serve import load_serve_config, serve_deploy_config

    doc = yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())
    conf = yaml.safe_load(doc["spec"]["serveConfigV2"])
    wd = conf["applications"][0]["runtime_env"]["working_dir"]
    cfg = load_serve_config(ROOT / "jobs" / "configs" / "serve_cluster.yaml")
    assert conf == serve_deploy_config(cfg, {"working_dir": wd})
    assert wd.startswith("https://") and wd.endswith(".zip")  # a remote URI every pod can fetch


def test_rayservice_serve_config_passes_ray_serve_schema_and_autoscaling_checks():
    from ray.serve.config import AutoscalingConfig as RayAutoscaling
    from ray.serve.schema import ServeDeploySchema

    from llamapro.serve import AutoscalingConfig, serve_config_from_dict

    doc = yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())
    conf = yaml.safe_load(doc["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(conf)
    (app,) = schema.applications
    assert app.import_path == "llamapro.serve:build_app"
    cfg = serve_config_from_dict(app.args["serve"])  # what build_app does with its args
    deps = {d["name"]: d for d in conf["applications"][0]["deployments"]}
    assert set(deps) == {"ingress", *(f"model-{m}" for m in cfg.models)}
    for name in cfg.models:
        ac = deps[f"model-{name}"]["autoscaling_config"]
        RayAutoscaling(**ac)
        AutoscalingConfig(**ac)  # strict: Ray itself accepts a misspelled key without a word
        assert ac["max_replicas"] > ac["min_replicas"] >= 1  # it really autoscales
    # the cluster can host it: Serve's port is exposed, every model path is mounted, the API key
    # the ingress needs is in every Ray container
    assert conf["http_options"] == {"host": "0.0.0.0", "port": 8000}
    head = _cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": 8000, "name": "serve"} in head["ports"]
    mounts = {m["mountPath"] for c in _containers(doc) for m in c.get("volumeMounts", [])}
    for m in cfg.models.values():
        assert m.path.startswith("demo:") or any(m.path.startswith(p + "/") for p in mounts), m.path
    key = app.args["serve"]["api_key_env"]
    assert key and all(key in {e["name"] for e in c.get("env", [])} for c in _containers(doc))
    assert _cluster_spec(doc)["enableInTreeAutoscaling"] is True


def test_serve_schema_rejects_a_broken_serve_config():
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    conf = yaml.safe_load(yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())
                          ["spec"]["serveConfigV2"])
    bad = copy.deepcopy(conf)
    bad["applications"][0]["runtime_env"] = {"working_dir": "."}  # not fetchable by the pods
    with pytest.raises(ValidationError):
        ServeDeploySchema.model_validate(bad)


# --- jobs/: one thin `ray job submit` entrypoint per step, each documenting its command ---------

JOBS = ["expand", "data", "train", "eval", "export", "fuse", "tune", "serve", "pipeline"]


@pytest.mark.parametrize("name", JOBS)
def test_each_job_shows_its_ray_job_submit_command(name):
    src = (ROOT / "jobs" / f"{name}.py").read_text()
    doc = src[:src.index('"""', 3)]  # the module docstring as written
    assert "ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\" in doc
    assert f"python jobs/{name}.py --config jobs/configs/" in doc
    config = re.search(r"--config (jobs/configs/\S+\.yaml)", doc).group(1)
    assert (ROOT / config).is_file()  # the example runs a shipped config


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_open_with_the_command_that_runs_them(path):
    head = path.read_text().splitlines()[:12]
    assert head[0].startswith("#")
    assert any(re.match(r"#\s+(llamapro|ray job submit|python)\b.*" + re.escape(path.name), line)
               for line in head), f"{path.name}: name the command that runs it in its first lines"
