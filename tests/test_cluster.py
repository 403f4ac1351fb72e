"""What a platform team deploys, checked: the manifests in cluster/ against the CRD schemas of the
KubeRay release they name (tests/data/kuberay/), the image they name against cluster/Dockerfile and
the lock, the identity, memory and GPU settings of every pod, and the entry points they run."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CRDS = Path(__file__).resolve().parent / "data" / "kuberay"
KUBERAY_MANIFESTS = {"rayjob.yaml": "ray.io_rayjobs.json", "rayservice.yaml": "ray.io_rayservices.json"}
JOBS_IN_IMAGE = "/home/ray/jobs/"  # where cluster/Dockerfile copies jobs/
DECODE_TASK_GIB = 0.5  # kissray.pipeline.DECODE_TASK_MEMORY_BYTES: what one decode task asks of Ray
MODEL_ACTOR_GIB = 2  # a classifier actor: torch + the ~330 MB checkpoint (docs/score.md, measured 1.25 GB)


def load(name: str) -> dict:
    (doc,) = [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]
    return doc


# ---------------------------------------------------------------- CRD schemas, as the API server reads them


@functools.cache
def crd(file: str) -> dict:
    return json.loads((CRDS / file).read_text())


def to_json_schema(node, path=(), cel=None):
    """A CRD's structural OpenAPI v3 schema as a JSON Schema that rejects what the API server rejects
    (kubectl's strict field validation): unknown fields fail unless the schema preserves them."""
    if isinstance(node, list):
        return [to_json_schema(n, path, cel) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "x-kubernetes-validations":
            cel.append("/".join(path))  # CEL rules: not evaluated here, so such fields must stay unset
        elif key == "properties":
            out[key] = {name: to_json_schema(s, (*path, name), cel) for name, s in value.items()}
        elif not key.startswith("x-kubernetes-"):
            out[key] = to_json_schema(value, path, cel)
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


OBJECT_META = {  # the ObjectMeta fields a manifest may set (the API server validates metadata itself)
    "type": "object", "additionalProperties": False, "required": ["name"],
    "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
                   "namespace": {"type": "string"},
                   "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                   "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}


@functools.cache
def crd_validator(file: str) -> tuple[jsonschema.Draft4Validator, tuple[str, ...]]:
    definition = crd(file)
    (version,) = [v for v in definition["spec"]["versions"] if v["storage"]]
    cel: list[str] = []
    schema = to_json_schema(version["schema"]["openAPIV3Schema"], cel=cel)
    schema["properties"]["metadata"] = OBJECT_META
    schema["properties"].pop("status", None)  # written by the operator, never by a manifest
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    schema["properties"]["apiVersion"] = {"enum": [f"{definition['spec']['group']}/{version['name']}"]}
    schema["properties"]["kind"] = {"enum": [definition["spec"]["names"]["kind"]]}
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema), tuple(cel)


def schema_errors(manifest: dict, file: str) -> list[str]:
    validator, _ = crd_validator(file)
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest))


def set_paths(node, prefix=()):
    """Every path a manifest sets, with list indexes left out (to compare with schema paths)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield "/".join((*prefix, key))
            yield from set_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for item in node:
            yield from set_paths(item, prefix)


@pytest.mark.parametrize("name", sorted(KUBERAY_MANIFESTS))
def test_manifest_validates_against_the_kuberay_crd(name):
    manifest = load(name)
    assert schema_errors(manifest, KUBERAY_MANIFESTS[name]) == []
    _, cel_paths = crd_validator(KUBERAY_MANIFESTS[name])
    assert cel_paths and not set(cel_paths) & set(set_paths(manifest))  # no field whose rule we cannot run


def test_crds_are_the_release_the_manifests_name():
    readme = (CRDS / "README.md").read_text()
    release = re.search(r"KubeRay (v\d+\.\d+\.\d+)", readme).group(1)
    for name, file in KUBERAY_MANIFESTS.items():
        assert f"KubeRay {release}" in (CLUSTER / name).read_text().splitlines()[0], name
        assert file in readme and crd(file)["kind"] == "CustomResourceDefinition"


MISSPELLINGS = [  # (where, a wrong key for a right one): each must fail the schema
    (("spec",), "entrypont", "entrypoint"),
    (("spec", "rayClusterSpec", "headGroupSpec"), "rayStartParam", "rayStartParams"),
    (("spec", "rayClusterSpec", "workerGroupSpecs", 1), "maxReplica", "maxReplicas"),
    (("spec", "rayClusterSpec", "workerGroupSpecs", 1, "template", "spec"), "toleration", "tolerations"),
    (("spec", "rayClusterSpec", "workerGroupSpecs", 1, "template", "spec", "containers", 0), "resource", "resources"),
    (("spec", "rayClusterSpec", "workerGroupSpecs", 1, "template", "spec", "volumes", 0, "emptyDir"),
     "size_limit", "sizeLimit"),
    (("metadata",), "nmae", "name"),
]


def at(node, path):
    for key in path:
        node = node[key]
    return node


@pytest.mark.parametrize("where, wrong, right", MISSPELLINGS, ids=[m[1] for m in MISSPELLINGS])
def test_a_misspelt_field_fails_the_schema(where, wrong, right):
    manifest = copy.deepcopy(load("rayjob.yaml"))
    parent = at(manifest, where)
    parent[wrong] = parent.pop(right)
    errors = schema_errors(manifest, "ray.io_rayjobs.json")
    assert any(wrong in e for e in errors), errors


@pytest.mark.parametrize("path, bad", [
    (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "replicas"), "two"),  # a string for an integer
    (("spec", "rayClusterSpec", "workerGroupSpecs", 1, "template", "spec", "containers", 0, "resources",
      "limits", "memory"), "48 GB"),  # not a Kubernetes quantity
    (("spec", "shutdownAfterJobFinishes"), "yes"),  # a string for a boolean
    (("kind",), "RayJobs"),
])
def test_a_wrong_value_fails_the_schema(path, bad):
    manifest = copy.deepcopy(load("rayjob.yaml"))
    at(manifest, path[:-1])[path[-1]] = bad
    assert schema_errors(manifest, "ray.io_rayjobs.json")


SERVICE_ACCOUNT = {  # core/v1 ServiceAccount (Kubernetes API reference): no CRD schema exists for it
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata"],
    "properties": {"apiVersion": {"enum": ["v1"]}, "kind": {"enum": ["ServiceAccount"]}, "metadata": OBJECT_META,
                   "automountServiceAccountToken": {"type": "boolean"},
                   "imagePullSecrets": {"type": "array"}, "secrets": {"type": "array"}}}


def test_service_account_is_a_valid_core_object_with_a_cloud_identity():
    account = load("serviceaccount.yaml")
    jsonschema.Draft4Validator(SERVICE_ACCOUNT).validate(account)
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    bad = dict(account, automountServiceAcountToken=True)
    assert list(jsonschema.Draft4Validator(SERVICE_ACCOUNT).iter_errors(bad))


# ---------------------------------------------------------------- what every pod gets


def pod_groups(name: str) -> list[tuple[str, dict, dict]]:
    """(group name, rayStartParams, pod spec) of the head and every worker group."""
    spec = load(name)["spec"]
    cluster = spec.get("rayClusterSpec") or spec["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    return [(n, g.get("rayStartParams", {}), g["template"]["spec"]) for n, g in groups]


def gib(quantity) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)(Gi|Mi)?", str(quantity)).groups()
    return float(number) / (1024 if unit == "Mi" else 1) if unit else float(number) / 2**30


ALL_PODS = [(m, g) for m in KUBERAY_MANIFESTS for g, _, _ in pod_groups(m)]


@pytest.mark.parametrize("name, group", ALL_PODS)
def test_every_pod_has_the_identity_the_image_and_a_memory_backed_shm(name, group):
    (start, pod), = [(s, p) for g, s, p in pod_groups(name) if g == group]
    assert pod["serviceAccountName"] == load("serviceaccount.yaml")["metadata"]["name"]
    shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
    assert len(shm) == 1, "one memory-backed emptyDir for /dev/shm"
    for container in pod["containers"]:
        assert container["image"] == expected_image()
        assert {"name": shm[0]["name"], "mountPath": "/dev/shm"} in container["volumeMounts"]
        limits = container["resources"]["limits"]
        assert container["resources"]["requests"] == limits  # guaranteed QoS: no eviction mid-title
        object_store_gib = int(start["object-store-memory"]) / 2**30
        assert object_store_gib <= gib(shm[0]["emptyDir"]["sizeLimit"]) <= gib(limits["memory"])


@pytest.mark.parametrize("name, group", ALL_PODS)
def test_gpu_pods_ask_for_gpus_and_tolerate_the_gpu_taint(name, group):
    (start, pod), = [(s, p) for g, s, p in pod_groups(name) if g == group]
    gpus = sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in pod["containers"])
    tolerates = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod.get("tolerations", [])
    assert bool(gpus) == tolerates == (group == "gpu")
    if group == "head":
        assert start["num-cpus"] == "0"  # the driver / Serve controller only


def job_options():
    job = load("rayjob.yaml")["spec"]
    words = shlex.split(job["entrypoint"])
    assert words[0] == "python" and words[1].startswith(JOBS_IN_IMAGE)
    script = ROOT / "jobs" / words[1][len(JOBS_IN_IMAGE):]
    return script, load_job_parser(script).parse_args(words[2:])


def test_rayjob_resources_fit_what_the_job_asks_of_ray():
    _, args = job_options()
    for group, _, pod in pod_groups("rayjob.yaml")[1:]:
        (container,) = pod["containers"]
        limits = container["resources"]["limits"]
        gpus, cpus = int(limits.get("nvidia.com/gpu", 0)), int(limits["cpu"])
        actors = int(gpus // args.num_gpus_per_actor) if gpus else 0
        assert gpus == 0 or actors >= 1 and gpus % args.num_gpus_per_actor == 0, group
        decode_tasks = cpus - actors  # every actor takes 1 CPU; the rest decode
        assert decode_tasks >= 8 * max(actors, 1) or not gpus, f"{group}: too few decode CPUs per GPU"
        shm = next(v["emptyDir"]["sizeLimit"] for v in pod["volumes"] if v["name"] == "dshm")
        need = gib(shm) + decode_tasks * DECODE_TASK_GIB + actors * MODEL_ACTOR_GIB
        assert need <= gib(limits["memory"]), f"{group}: {need} GiB needed"


def test_rayservice_gpu_groups_fit_the_serve_config():
    serve_args = yaml.safe_load(load("rayservice.yaml")["spec"]["serveConfigV2"])["applications"][0]["args"]
    gpus = [int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for g, _, p in pod_groups("rayservice.yaml")
            for c in p["containers"]]
    assert max(gpus) >= serve_args.get("num_gpus", 0)
    cpus = [int(c["resources"]["limits"]["cpu"]) for g, _, p in pod_groups("rayservice.yaml")[1:] for c in p["containers"]]
    assert max(cpus) >= serve_args["ingress_cpus"]  # an Ingress replica fits on a worker


def unknown_serve_keys(model, data: dict, path: str = "") -> list[str]:
    """Keys of a Serve config that its pydantic model does not declare. Serve's schema classes ignore
    unknown keys (a misspelt `max_ongoing_request` would be dropped without a word), so look."""
    import typing

    from pydantic import BaseModel

    def models(annotation):
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [m for arg in typing.get_args(annotation) for m in models(arg)]

    fields = {(f.alias or name): f for name, f in model.model_fields.items()}
    found = []
    for key, value in data.items():
        if key not in fields:
            found.append(path + key)
            continue
        for sub in models(fields[key].annotation):
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, dict):
                    found += unknown_serve_keys(sub, item, f"{path}{key}.")
    return found


def serve_config(name: str) -> dict:
    doc = load(name)
    return yaml.safe_load(doc["spec"]["serveConfigV2"]) if name == "rayservice.yaml" else doc


@pytest.mark.parametrize("name", ["rayservice.yaml", "serve-config.yaml"])
def test_serve_configs_load_with_ray_serves_schema(name):
    from ray.serve.schema import ServeDeploySchema

    config = serve_config(name)
    (app,) = ServeDeploySchema.model_validate(config).applications
    assert unknown_serve_keys(ServeDeploySchema, config) == []
    module, _, attr = app.import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_a_misspelt_serve_key_is_caught():
    from ray.serve.schema import ServeDeploySchema

    config = copy.deepcopy(serve_config("serve-config.yaml"))
    config["proxy_locaton"] = config.pop("proxy_location")
    config["http_options"]["prot"] = config["http_options"].pop("port")
    config["applications"][0]["import_pth"] = "x"
    ServeDeploySchema.model_validate(config)  # Serve itself accepts all three
    assert sorted(unknown_serve_keys(ServeDeploySchema, config)) == [
        "applications.import_pth", "http_options.prot", "proxy_locaton"]


# ---------------------------------------------------------------- nothing installed at run time


def test_no_manifest_installs_code_at_run_time():
    job = load("rayjob.yaml")["spec"]
    assert "runtimeEnvYAML" not in job  # no pip / working_dir: the image has everything
    serve = yaml.safe_load(load("rayservice.yaml")["spec"]["serveConfigV2"])
    for config in (serve, load("serve-config.yaml")):
        assert all("runtime_env" not in app for app in config["applications"])
    launcher = load("cluster.yaml")
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "file_mounts"):
        assert not launcher.get(key), key
    commands = " ".join(launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"])
    assert "pip" not in commands


def test_launcher_runs_the_image_and_gives_every_node_an_s3_identity():
    launcher = load("cluster.yaml")
    assert launcher["docker"]["image"] == expected_image()
    assert any("--shm-size" in o for o in launcher["docker"]["run_options"])
    types = launcher["available_node_types"]
    assert types[launcher["head_node_type"]]["resources"] == {"CPU": 0}
    for name, node in types.items():
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    assert any(n["node_config"]["InstanceType"].startswith(("g", "p")) for n in types.values())
    assert "boto3" in locked("requirements.lock")  # the AWS autoscaler runs on the head, in the image


# ---------------------------------------------------------------- image, lock, versions


def expected_image() -> str:
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    return f"REGISTRY/kissray:{version}-gpu@sha256:DIGEST"


def locked(file: str) -> dict[str, str]:
    text = (ROOT / file).read_text()
    entries = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)((?:\s*\\\n\s+--hash=sha256:[0-9a-f]{64})+)", text, re.M)
    assert len(entries) == len(re.findall(r"^[A-Za-z0-9]", text, re.M)), f"{file}: an entry without a pin or hash"
    return {name.lower(): version for name, version, _ in entries}


def test_lock_files_pin_everything_with_hashes_and_agree():
    runtime, test = locked("requirements.lock"), locked("requirements-test.lock")
    assert {k: test.get(k) for k in runtime} == runtime  # what the image ships is what CI tests
    for line in (CLUSTER / "lock-pins.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            assert runtime[name] == version, line


def test_declared_bounds_hold_for_the_locked_versions():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    test = locked("requirements-test.lock")
    assert project["requires-python"] == ">=3.11"
    for spec in project["dependencies"] + sum(project["optional-dependencies"].values(), []):
        req = Requirement(spec)
        version = test[req.name.lower()]
        assert req.specifier.contains(version), f"{spec} does not admit the locked {version}"
        floors = [s.version for s in req.specifier if s.operator in (">=", "==")]
        assert floors and Version(floors[0]) <= Version(version), spec  # a lower bound, and a tested one


def test_dockerfile_builds_from_the_locked_ray_and_runs_the_one_install_script():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    ray = locked("requirements.lock")["ray"]
    assert f"ARG RAY_IMAGE=rayproject/ray:{ray}-py311-gpu" in dockerfile
    assert re.findall(r"^FROM (\S+)", dockerfile, re.M) == ["${RAY_IMAGE}", "${RAY_IMAGE}"]
    for name in KUBERAY_MANIFESTS:
        spec = load(name)["spec"]
        assert (spec.get("rayClusterSpec") or spec["rayClusterConfig"])["rayVersion"] == ray
    final = dockerfile.rsplit("\nFROM ", 1)[1]
    assert "cluster/install.sh" in final and "requirements.lock" in final
    assert not re.search(r"apt-get|build-essential|gcc", final)  # no build tools in the shipped stage
    assert re.findall(r"^USER (\S+)", final, re.M)[-1] not in ("root", "0")
    assert f"COPY --chown=ray:users jobs {JOBS_IN_IMAGE.rstrip('/')}" in final
    assert "cluster/install.sh $(PY) $(TEST_LOCK) editable ." in (ROOT / "Makefile").read_text()


# ---------------------------------------------------------------- entry points and documented commands


def load_job_parser(script: Path):
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def test_rayjob_entrypoint_parses_with_the_job_script():
    script, args = job_options()
    assert args.inputs and args.model.startswith("s3://") and args.out.startswith("s3://")
    assert args.num_gpus_per_actor == 1 and args.no_progress


def documented_job_commands() -> list[str]:
    """`python /home/ray/jobs/...` commands in docs/deployment.md and the manifests' comments."""
    comments = ["\n".join(line for line in p.read_text().splitlines() if line.lstrip().startswith("#"))
                for p in CLUSTER.glob("*.yaml")]
    texts = [(ROOT / "docs" / "deployment.md").read_text(), *comments]
    found = []
    for text in texts:
        joined = re.sub(r"\\\n(#\s*)?", " ", text)
        found += re.findall(rf"python ({re.escape(JOBS_IN_IMAGE)}\S+ [^\n`]*)", joined)
    return found


def test_documented_job_commands_parse():
    commands = documented_job_commands()
    assert len(commands) >= 2
    for command in commands:
        words = shlex.split(command)
        script = ROOT / "jobs" / words[0][len(JOBS_IN_IMAGE):]
        args = load_job_parser(script).parse_args(words[1:])
        assert args.model and args.out, command


def test_every_placeholder_is_in_the_deployment_table():
    table = (ROOT / "docs" / "deployment.md").read_text().split("## Placeholders", 1)[1]
    manifests = " ".join(p.read_text() for p in CLUSTER.glob("*.yaml"))
    for token in ("REGISTRY", "DIGEST", "ACCOUNT_ID", "my-bucket", "kissray-api-key", "kissray-s3",
                  "kissray-head", "kissray-worker"):
        assert token in manifests and f"`{token}" in table, token


def test_job_entry_point_help_runs():
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "score_titles.py"), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for option in ("--model", "--out", "--address", "--window-s", "--num-gpus-per-actor", "--batch-size"):
        assert option in done.stdout
