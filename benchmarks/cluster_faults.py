"""The library job on a real multi-node Ray (``ray.cluster_utils.Cluster``: a head and worker
raylets on this machine) while something goes wrong mid-run; used by tests/test_cluster_faults.py
and to measure what a lost node costs.

Scenarios: ``none``; ``node_removed`` (a worker node is removed once titles have started to
finish); ``classifier_killed`` / ``writer_killed`` (the actor's process gets SIGKILL mid-run);
``gpu_added`` (the head has no GPU, one worker a GPU resource; a second GPU node joins mid-run and
the classifier pool must grow onto it). Prints one JSON object per scenario: the run's summary, the
largest number of classifier actors seen alive at once, how many nodes ever ran one, and what was
done to the cluster. Several scenarios (not ``gpu_added``: its cluster has GPUs) run one after the
other on one cluster, each into ``OUT/<scenario>``; a removed node is replaced in between.

    python benchmarks/cluster_faults.py --films DIR --model CKPT --out OUT --scenario node_removed
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCENARIOS = ("none", "node_removed", "classifier_killed", "writer_killed", "gpu_added")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--films", required=True, help="a directory of films (or any kissray score INPUT)")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--scenario", choices=SCENARIOS, nargs="+", default=["none"],
                   help="one or more; several run in turn on one cluster, into OUT/<scenario>")
    p.add_argument("--workers", type=int, default=2, help="worker nodes, 1 CPU each (the head has 1 CPU)")
    p.add_argument("--window-s", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--after-titles", type=int, default=1, help="act once this many titles are written")
    return p


def start_cluster(scenario: str, workers: int):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1, num_gpus=1 if scenario == "gpu_added" and i == 0 else 0)
             for i in range(workers)]
    cluster.wait_for_nodes()
    return cluster, nodes


def _cmdline(pid: int | str) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace")


def _children(pid: int) -> list[int]:
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(k) for k in f.read().split()]
        except OSError:  # the thread ended meanwhile
            continue
    return kids


def actors_by_raylet(name: str) -> dict[int, list[int]]:
    """Raylet pid -> pids of this cluster's Ray Data actors for the stage ``name`` (Classifier,
    TitleWriter): the raylets' children titled ``ray::...MapBatches(<name>)``. Every raylet of a
    ``Cluster`` is a child of this process, so this reads a few /proc files, not all of them, and
    can be sampled often (no dashboard needed)."""
    found: dict[int, list[int]] = {}
    for raylet in _children(os.getpid()):
        try:
            if "raylet" not in _cmdline(raylet).split(" ", 1)[0]:
                continue
            kids = _children(raylet)
        except OSError:
            continue
        for kid in kids:
            try:
                if _cmdline(kid).startswith("ray::") and f"MapBatches({name})" in _cmdline(kid):
                    found.setdefault(raylet, []).append(kid)
            except OSError:
                continue
    return found


def actor_pids(name: str) -> list[int]:
    """Pids of this cluster's Ray Data actors for the stage ``name``, on every node."""
    return sorted(pid for pids in actors_by_raylet(name).values() for pid in pids)


def wait_until_no_actors(timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while actor_pids("Classifier") or actor_pids("TitleWriter"):
        if time.monotonic() > deadline:
            raise RuntimeError("the finished job's actors did not exit")
        time.sleep(0.2)


def written_titles(out: str) -> int:
    folder = Path(out) / "titles"
    return sum(p.suffix == ".parquet" for p in folder.iterdir()) if folder.is_dir() else 0


def disturb(cluster, nodes, scenario: str, out: str, after_titles: int, done: threading.Event) -> dict:
    """Wait until ``after_titles`` are written, then do the scenario's harm; returns what was done,
    with the classifier actors seen: most alive at once, and how many nodes ever ran one (sampled
    every 0.05 s: an actor lives at least as long as its model takes to load)."""
    seen = {"max_classifiers": 0, "action": None, "at_titles": None}
    classifier_nodes: set[int] = set()
    while not done.is_set():
        classifiers = actors_by_raylet("Classifier")
        classifier_nodes |= set(classifiers)
        seen["max_classifiers"] = max(seen["max_classifiers"], sum(map(len, classifiers.values())))
        if seen["action"] is None and written_titles(out) >= after_titles:
            seen["at_titles"] = written_titles(out)
            seen["action"] = act(cluster, nodes, scenario)
        done.wait(0.05)
    return {**seen, "classifier_nodes": len(classifier_nodes)}


def act(cluster, nodes, scenario: str) -> str:
    if scenario == "node_removed":
        cluster.remove_node(nodes[-1], allow_graceful=False)
        return "removed a worker node"
    if scenario in ("classifier_killed", "writer_killed"):
        pids = actor_pids("Classifier" if scenario == "classifier_killed" else "TitleWriter")
        for pid in pids[:1]:
            os.kill(pid, signal.SIGKILL)
        return f"SIGKILL to {len(pids[:1])} actor(s)"
    if scenario == "gpu_added":
        cluster.add_node(num_cpus=1, num_gpus=1)
        return "added a GPU node"
    return "nothing"


def run_job(args, out: str, done: threading.Event, outcome: dict) -> None:
    """The library job, as ``kissray score`` runs it (in a thread: Cluster changes need the main one)."""
    from kissray.pipeline import out_lock, prepare_library, run_library
    from kissray.score import SegmentParams

    try:
        with out_lock(out):
            job = prepare_library([args.films], args.model, out)
            outcome["summary"] = run_library(job, params=SegmentParams(threshold=0.47, min_len=3, min_fraction=0.6),
                                             window_s=args.window_s, batch_size=args.batch_size,
                                             decode_timeout_s=60, progress=False)
    except BaseException as e:
        outcome["error"] = e
    finally:
        done.set()


def run_scenario(cluster, nodes, scenario: str, args, out: str) -> dict:
    """One scenario on the running cluster: the job in a thread, the harm from this (main) thread."""
    done, outcome = threading.Event(), {}
    started = time.monotonic()
    job = threading.Thread(target=run_job, args=(args, out, done, outcome))
    job.start()
    seen = disturb(cluster, nodes, scenario, out, args.after_titles, done)
    job.join()
    if "error" in outcome:
        raise outcome["error"]
    summary = outcome["summary"]
    return {"scenario": scenario, "wall_s": round(time.monotonic() - started, 2), "n_titles": summary.n_titles,
            "n_ok": summary.n_ok, "n_failed": summary.n_failed, "n_partial": summary.n_partial,
            "attempts": summary.attempts, "failures": summary.failures, **seen}


def main(argv: list[str] | None = None) -> int:
    import ray

    args = build_parser().parse_args(argv)
    scenarios = args.scenario
    if "gpu_added" in scenarios and len(scenarios) > 1:
        raise SystemExit("gpu_added runs alone: its cluster has GPU nodes")
    cluster, nodes = start_cluster(scenarios[0], args.workers)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        for scenario in scenarios:
            out = args.out if len(scenarios) == 1 else os.path.join(args.out, scenario)
            print(json.dumps(run_scenario(cluster, nodes, scenario, args, out)), flush=True)
            if scenario == "node_removed":  # the next scenario gets the cluster it would have had alone
                nodes[-1] = cluster.add_node(num_cpus=1)
                cluster.wait_for_nodes()
            wait_until_no_actors()  # the next scenario's harm must not land on this job's leftovers
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
