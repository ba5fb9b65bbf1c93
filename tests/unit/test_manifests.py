"""Cluster manifests parse and validate against their schemas, and say what they claim.

- The cluster-launcher YAML against Ray's own schema (`ray/autoscaler/ray-schema.json` of the pinned ray) and
  through Ray's `prepare_config` + `validate_config`, as `ray up` does.
- The KubeRay RayCluster/RayJob/RayService against the vendored ray.io/v1 schema (cluster/schemas/), which
  must also reject typical mistakes (so a pass means something).
- What the schema cannot see: CPU and GPU groups with autoscaling bounds, the embedded cluster specs kept equal,
  job entrypoints that are valid raygpt job specs, a Serve config that Ray Serve's own schema accepts.
"""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "cluster" / "manifests"
KUBERAY = sorted(p for p in MANIFESTS.glob("*.yaml") if p.name != "cluster-launcher.yaml")
IMAGE_CODE_DIR = "/home/ray/raygpt"  # where cluster/Dockerfile puts the project


def _load(name: str) -> dict:
    return yaml.safe_load((MANIFESTS / name).read_text())


@pytest.fixture(scope="module")
def kuberay_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((ROOT / "cluster" / "schemas" / "kuberay-ray.io-v1.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _kind_validator(v: jsonschema.Draft202012Validator, kind: str) -> jsonschema.Draft202012Validator:
    sub = {"$ref": f"#/$defs/{kind}", "$defs": v.schema["$defs"]}
    return jsonschema.Draft202012Validator(sub)


# --- cluster launcher -------------------------------------------------------------------------------------
def test_launcher_validates_against_rays_schema():
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load("cluster-launcher.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs before touching the cloud

    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_worker"]["max_wokers"] = 4
    with pytest.raises(jsonschema.ValidationError, match="max_wokers"):
        jsonschema.validate(bad, schema)


def test_launcher_node_types_and_loopback_dashboard():
    config = _load("cluster-launcher.yaml")
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert types["gpu_worker"]["resources"]["GPU"] >= 1 and types["gpu_worker"]["min_workers"] == 0
    for name in ("cpu_worker", "gpu_worker"):
        assert types[name]["min_workers"] < types[name]["max_workers"] <= config["max_workers"]
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start


# --- KubeRay ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_validates(path, kuberay_validator):
    doc = yaml.safe_load(path.read_text())
    errors = sorted(kuberay_validator.iter_errors(doc), key=str)
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def _cluster_spec(doc: dict) -> dict:
    return {"RayCluster": lambda: doc["spec"], "RayJob": lambda: doc["spec"]["rayClusterSpec"],
            "RayService": lambda: doc["spec"]["rayClusterConfig"]}[doc["kind"]]()


MUTATIONS = {
    "group without groupName": lambda s: s["workerGroupSpecs"][0].pop("groupName"),
    "misspelt maxReplicas": lambda s: s["workerGroupSpecs"][0].update(maxReplica=3),
    "replicas as a string": lambda s: s["workerGroupSpecs"][0].update(minReplicas="1"),
    "negative replicas": lambda s: s["workerGroupSpecs"][0].update(maxReplicas=-1),
    "rayStartParams value not a string": lambda s: s["workerGroupSpecs"][1]["rayStartParams"].update({"num-gpus": 1}),
    "bad quantity": lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    .update(cpu="8 cores"),
    "container without name": lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].pop("name"),
    "unknown pod field": lambda s: s["headGroupSpec"]["template"]["spec"].update(tolerationz=[]),
    "head without template": lambda s: s["headGroupSpec"].pop("template"),
    "bad upscalingMode": lambda s: s["autoscalerOptions"].update(upscalingMode="Fast"),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_schema_rejects_mistakes(name, kuberay_validator):
    doc = _load("raycluster.yaml")
    MUTATIONS[name](_cluster_spec(doc))
    assert not kuberay_validator.is_valid(doc), name


def test_schema_rejects_bad_job_and_service_fields(kuberay_validator):
    job = _load("rayjob-pretrain.yaml")
    job["spec"]["submissionMode"] = "K8sMode"
    assert not _kind_validator(kuberay_validator, "RayJob").is_valid(job)
    svc = _load("rayservice.yaml")
    svc["spec"]["serveConfig"] = svc["spec"].pop("serveConfigV2")  # the removed v1alpha1 field name
    assert not _kind_validator(kuberay_validator, "RayService").is_valid(svc)
    wrong_version = _load("raycluster.yaml")
    wrong_version["apiVersion"] = "ray.io/v1alpha1"
    assert not kuberay_validator.is_valid(wrong_version)


def _container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def test_raycluster_cpu_and_gpu_groups_autoscale():
    spec = _load("raycluster.yaml")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"]
        assert g["minReplicas"] < g["maxReplicas"], "autoscaling needs room between min and max"
    gpu_limits = _container(groups["gpu"])["resources"]["limits"]
    assert int(gpu_limits["nvidia.com/gpu"]) == int(groups["gpu"]["rayStartParams"]["num-gpus"]) >= 1
    assert "nvidia.com/gpu" not in _container(groups["cpu"])["resources"]["limits"]
    images = {_container(g)["image"] for g in [spec["headGroupSpec"], *groups.values()]}
    assert len(images) == 1, "head and workers must run the same image (same Ray and Python)"


def test_embedded_cluster_specs_match_raycluster():
    base = _load("raycluster.yaml")["spec"]
    assert _load("rayjob-pretrain.yaml")["spec"]["rayClusterSpec"] == base
    assert _load("rayservice.yaml")["spec"]["rayClusterConfig"] == base


def _job_commands(entrypoint: str) -> list[list[str]]:
    """`cd X && python -m jobs.a … && python -m jobs.b …` → [[module, args…], …] (the `cd` dropped)."""
    commands = []
    for part in entrypoint.split("&&"):
        argv = shlex.split(part)
        if argv[0] == "cd":
            continue
        assert argv[:2] == ["python", "-m"], f"entrypoint step {part!r} is not `python -m jobs.<name> …`"
        commands.append(argv[2:])
    return commands


def test_rayjob_entrypoint_is_a_valid_raygpt_pipeline():
    from ray.runtime_env import RuntimeEnv

    from jobs.cli import COMMANDS, resolve_job

    spec = _load("rayjob-pretrain.yaml")["spec"]
    RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))
    modules = {mod: name for name, (mod, _) in COMMANDS.items()}
    steps = _job_commands(spec["entrypoint"])
    assert [s[0] for s in steps] == ["jobs.tokenizer", "jobs.prepare", "jobs.pretrain"]
    for module, *args in steps:
        args = [a.replace(IMAGE_CODE_DIR, str(ROOT)) for a in args]  # --config files live in the image
        resolved = resolve_job(modules[module], args)  # raises ConfigError naming the field
        assert resolved.module == module


def test_rayservice_serve_config_is_valid_for_ray_serve_and_raygpt():
    import importlib

    from ray.serve.schema import ServeDeploySchema

    from jobs.config import load_config

    serve_config = yaml.safe_load(_load("rayservice.yaml")["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    (app,) = serve_config["applications"]
    module, attr = app["import_path"].split(":")
    serve_module = importlib.import_module(module)
    assert callable(getattr(serve_module, attr))
    args = dict(app["args"])
    models = args.pop("models").split(",")
    assert {m.split("=")[0] for m in models} == {"ppo", "sft"}
    cfg = load_config(serve_module.ServeConfig, None, [f"{k}={v}" for k, v in args.items()])
    assert cfg.scaling.min_replicas < cfg.scaling.max_replicas  # autoscaling on


def test_dockerfile_copies_the_project_packages():
    text = (ROOT / "cluster" / "Dockerfile").read_text()
    for pkg in ("models", "actors", "cluster", "jobs", "configs"):
        assert f"COPY --chown=ray:users {pkg} ./{pkg}" in text
        assert (ROOT / pkg).is_dir()
    assert "FROM rayproject/ray:2.60.0-" in text and "-c constraints.txt torch==2.13.0" in text
