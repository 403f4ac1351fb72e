"""cluster/*.yaml and jobs/: every manifest loads, and every import path, script, module and
command it names exists (and its arguments parse); the job entry point runs ``--help``."""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kissray.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((ROOT / "cluster").glob("*.y*ml"))
EMBEDDED_YAML_KEYS = ("serveConfigV2", "runtimeEnvYAML")  # KubeRay fields holding YAML text
COMMAND_KEYS = ("entrypoint", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands", "initialization_commands")


def documents(path: Path) -> list:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path.name} is empty"
    return docs


def walk(node, key=None):
    """(key, value) for every mapping entry, descending into lists and embedded YAML text."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            if k in EMBEDDED_YAML_KEYS and isinstance(v, str):
                v = yaml.safe_load(v)
            yield from walk(v, k)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def values(path: Path, wanted: tuple[str, ...]) -> list:
    found = []
    for doc in documents(path):
        for k, v in walk(doc):
            if k in wanted:
                found.extend(v if isinstance(v, list) else [v])
    return found


def load_job_parser():
    spec = importlib.util.spec_from_file_location("score_titles", ROOT / "jobs" / "score_titles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def test_cluster_folder_has_the_four_manifests():
    names = {p.name for p in MANIFESTS}
    assert {"cluster.yaml", "rayjob.yaml", "rayservice.yaml", "serve-config.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_import_paths_exist(path):
    for import_path in values(path, ("import_path",)):
        module_name, _, attr = import_path.partition(":")
        module = importlib.import_module(module_name)
        assert attr and callable(getattr(module, attr, None)), f"{path.name}: {import_path} is not callable"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_commands_name_existing_scripts_modules_and_subcommands(path):
    for command in values(path, COMMAND_KEYS):
        for line in re.split(r"[;&|]+|\n", command):
            words = shlex.split(line)
            for i, word in enumerate(words[:-1]):
                nxt = words[i + 1]
                if re.fullmatch(r"python3?", word) and nxt == "-m":
                    assert importlib.util.find_spec(words[i + 2]) is not None, f"{path.name}: {line}"
                elif re.fullmatch(r"python3?", word):
                    assert (ROOT / nxt).is_file(), f"{path.name}: no script {nxt}"
                elif word == "kissray":
                    assert nxt in COMMANDS and importlib.util.find_spec(f"kissray.commands.{nxt}"), line


def test_rayjob_entrypoint_parses_with_the_job_script():
    (job,) = documents(ROOT / "cluster" / "rayjob.yaml")
    assert job["kind"] == "RayJob"
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:2] == ["python", "jobs/score_titles.py"]
    args = load_job_parser().parse_args(words[2:])
    assert args.inputs and args.model and args.out
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert any(p.startswith("kissray") for p in runtime_env["pip"]["packages"])  # installs this package
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpu_limits = [c["resources"]["limits"].get("nvidia.com/gpu") for g in groups
                  for c in g["template"]["spec"]["containers"]]
    assert any(gpu_limits) and not all(gpu_limits)  # GPU workers for the model, CPU workers for decoding


def test_ray_versions_agree_with_images():
    for path in MANIFESTS:
        for doc in documents(path):
            versions = {v for k, v in walk(doc) if k == "rayVersion"}
            images = {v for k, v in walk(doc) if k in ("image",) and isinstance(v, str) and "rayproject/ray:" in v}
            for image in images:
                assert any(image.split(":")[1].startswith(v) for v in versions) or not versions, image


def test_cluster_launcher_has_cpu_head_and_gpu_workers():
    (config,) = documents(ROOT / "cluster" / "cluster.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["node_config"]["InstanceType"].startswith(("m", "c", "r"))  # no GPU on the head
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in types.values())
    for target, source in config["file_mounts"].items():
        assert (ROOT / source).exists(), source
    assert any("pip install" in c and "/kissray" in c for c in config["setup_commands"])


def test_job_entry_point_help_runs():
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "score_titles.py"), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for option in ("--model", "--out", "--address", "--window-s", "--actors", "--batch-size", "--frames-per-clip"):
        assert option in done.stdout
