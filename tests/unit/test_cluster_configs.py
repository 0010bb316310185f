"""cluster.yaml against Ray's own schema and validator; KubeRay manifests against the CRDs."""

import copy
import gzip
import json
import os
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


@pytest.mark.parametrize("path,kind", [("raycluster.yaml", "rayclusters"), ("rayjob.yaml", "rayjobs")])
def test_kuberay_manifests_match_the_crds(path, kind):
    doc = yaml.safe_load((ROOT / "cluster" / path).read_text())
    jsonschema.validate(doc, _crd(kind))
    bad = copy.deepcopy(doc)
    bad["spec"]["shutdownAfterJobFinish" if kind == "rayjobs" else "enableInTreeAutoscalling"] = True
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _crd(kind))
