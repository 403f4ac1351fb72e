"""The library job on a real multi-node Ray (``ray.cluster_utils.Cluster``: a head and worker
raylets on this machine) while something goes wrong mid-run; used by tests/test_cluster_faults.py
and to measure what a lost node costs.

Scenarios: ``none``; ``node_removed`` (a worker node is removed once titles have started to
finish); ``classifier_killed`` / ``writer_killed`` (the actor's process gets SIGKILL mid-run, the
writer while it holds a title's earlier rows); ``gpu_added`` (the head has no GPU, one worker a GPU
resource; a second GPU node joins mid-run and the classifier pool must grow onto it);
``actors_killed`` (the classifier, then the writer, each SIGKILLed while it holds a title);
``nodes_changed`` (``gpu_added``, then the CPU worker node is removed, in one run); ``churn`` (all
four in one run: a GPU node joins and the pool grows onto it, the held classifier is SIGKILLed, the
CPU worker node is removed, and the writer is SIGKILLed while it holds a title). The job waits
at a test-only hold point (:func:`steps`) while the harm is done, so it lands mid-run by
construction. Prints one JSON object: the run's summary, what was done to the cluster, and from
the GCS actor table (not sampled) the largest number of classifier actors alive at once and the
nodes that ran one.

    python benchmarks/cluster_faults.py --films DIR --model CKPT --out OUT --scenario node_removed
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCENARIOS = ("none", "node_removed", "classifier_killed", "writer_killed", "gpu_added", "actors_killed",
             "nodes_changed", "churn")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--films", required=True, help="a directory of films (or any kissray score INPUT)")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--scenario", choices=SCENARIOS, default="none")
    p.add_argument("--workers", type=int, default=2, help="worker nodes, 1 CPU each (the head has 1 CPU)")
    p.add_argument("--window-s", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--after-titles", type=int, default=1, help="node_removed: act once this many titles are committed")
    p.add_argument("--grow-timeout-s", type=float, default=300.0,
                   help="gpu_added, nodes_changed: how long the held classifier waits for the pool to grow onto the new node")
    return p


def start_cluster(scenario: str, workers: int):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    # the first worker has a GPU; one more joins mid-run
    gpus = scenario in ("gpu_added", "nodes_changed", "churn")
    nodes = [cluster.add_node(num_cpus=1, num_gpus=1 if gpus and i == 0 else 0)
             for i in range(workers)]
    cluster.wait_for_nodes()
    return cluster, nodes


def steps(scenario: str, titles: list[str], after_titles: int) -> list[tuple[tuple[str, str], list[str]]]:
    """The scenario's harms, each done while the job waits at a test-only hold point
    (kissray/batch/faults.py), so it lands mid-run by construction, not by the luck of a sample:
    [(hold point, harms done while held)]. ``commit``: once ``after_titles`` are committed;
    ``classifier``: the model actor about to score a title (which is then not finished);
    ``writer``: the writer about to add rows to a title it holds earlier rows of (a kill loses
    them). ``actors_killed`` and ``nodes_changed`` do two harms in one run, ``churn`` all four."""
    first, second = titles[0], titles[1 % len(titles)]
    return {"none": [],
            "node_removed": [(("commit", str(after_titles)), ["remove_node"])],
            "classifier_killed": [(("classifier", first), ["kill_classifier"])],
            "writer_killed": [(("writer", first), ["kill_writer"])],
            "gpu_added": [(("classifier", first), ["add_gpu_node"])],
            "actors_killed": [(("classifier", first), ["kill_classifier"]), (("writer", second), ["kill_writer"])],
            "nodes_changed": [(("classifier", first), ["add_gpu_node", "remove_node"])],
            "churn": [(("classifier", first), ["add_gpu_node", "kill_classifier", "remove_node"]),
                      (("writer", second), ["kill_writer"])]}[scenario]


def classifier_actors() -> list[dict]:
    """Every Ray Data model actor this cluster ran, alive or dead, from the GCS actor table (class
    ``MapWorker(MapBatches(Classifier))``): when it started and ended, and on which node."""
    import ray._private.state

    return [a for a in ray._private.state.actors().values()
            if "MapBatches(Classifier)" in a["ActorClassName"] and a["StartTime"]]


def most_at_once(actors: list[dict]) -> int:
    """The largest number of these actors alive at one moment, from their start and end times."""
    events = sorted([(a["StartTime"], 1) for a in actors]
                    + [(a["EndTime"], -1) for a in actors if a["EndTime"]], key=lambda e: (e[0], e[1]))
    alive = most = 0
    for _, step in events:
        alive += step
        most = max(most, alive)
    return most


def actor_pids(name: str) -> list[int]:
    """Pids of this cluster's live Ray Data actors for the stage ``name`` (Classifier, TitleWriter),
    from the GCS actor table (class ``MapWorker(MapBatches(<name>))``)."""
    import ray._private.state

    actors = ray._private.state.actors().values()
    return sorted(int(a["Pid"]) for a in actors
                  if a["State"] == "ALIVE" and a["Pid"] and f"MapBatches({name})" in a["ActorClassName"])


def written_titles(out: str) -> int:
    folder = Path(out) / "titles"
    return sum(p.suffix == ".parquet" and not p.name.startswith(".") for p in folder.iterdir()) if folder.is_dir() else 0


def disturb(cluster, nodes, args, plan: list, markers: Path, done: threading.Event) -> dict:
    """Whenever the job is held at one of the plan's points, do its harms, then release it."""
    seen = {"actions": [], "harm_s": [], "at_titles": None, "added_node": None}
    workers = list(nodes)  # as started: the node removed is the last of these
    pending = list(plan)
    try:
        while pending and not done.is_set():
            for point, harms in [step for step in pending if (markers / f"held-{step[0][0]}").exists()]:
                at = written_titles(args.out)
                seen["at_titles"] = at if seen["at_titles"] is None else max(seen["at_titles"], at)
                held_pid = int((markers / f"held-{point[0]}").read_text())
                for harm in harms:
                    began = time.monotonic()
                    seen["actions"].append(act(cluster, nodes, workers, harm, held_pid, args, seen, done))
                    seen["harm_s"].append(round(time.monotonic() - began, 2))
                (markers / f"release-{point[0]}").touch()
                pending.remove((point, harms))
            done.wait(0.05)
    finally:
        for point, _ in plan:
            (markers / f"release-{point[0]}").touch()
    return seen


def act(cluster, nodes, workers, harm: str, held_pid: int, args, seen: dict, done: threading.Event) -> str | None:
    if harm == "remove_node":
        cluster.remove_node(workers[-1], allow_graceful=False)
        return "removed a worker node"
    if harm in ("kill_classifier", "kill_writer"):
        stage = "Classifier" if harm == "kill_classifier" else "TitleWriter"
        if held_pid not in actor_pids(stage):
            return None  # the held process is not the stage's actor: fails the test
        os.kill(held_pid, signal.SIGKILL)
        return f"SIGKILL to the held {stage}"
    if harm == "add_gpu_node":
        nodes.append(cluster.add_node(num_cpus=1, num_gpus=1))
        seen["added_node"] = nodes[-1].node_id
        deadline = time.monotonic() + args.grow_timeout_s  # the held actor stays busy until the pool grew there
        while not done.is_set() and time.monotonic() < deadline and not any(
                a["State"] == "ALIVE" and a["Address"]["NodeID"] == seen["added_node"] for a in classifier_actors()):
            done.wait(0.2)
        return "added a GPU node"
    raise ValueError(harm)


def run_job(args, markers: Path, done: threading.Event, outcome: dict) -> None:
    """The library job, as ``kissray score`` runs it (in a thread: Cluster changes need the main one),
    with the scenario's hold point."""
    from kissray.batch.faults import FaultPlan
    from kissray.pipeline import out_lock, prepare_library, run_library
    from kissray.score import SegmentParams

    try:
        with out_lock(args.out) as lock:
            job = prepare_library([args.films], args.model, args.out, lock=lock)
            plan = steps(args.scenario, sorted(t.title_id for t in job.titles), args.after_titles)
            outcome["plan"] = plan
            faults = FaultPlan(hold_at=tuple(point for point, _ in plan), marker_dir=str(markers))
            outcome["summary"] = run_library(job, params=SegmentParams(threshold=0.47, min_len=3, min_fraction=0.6),
                                             window_s=args.window_s, batch_size=args.batch_size,
                                             decode_timeout_s=60, progress=False, faults=faults)
    except BaseException as e:
        outcome["error"] = e
    finally:
        done.set()


def main(argv: list[str] | None = None) -> int:
    import ray

    args = build_parser().parse_args(argv)
    began = time.monotonic()
    cluster, nodes = start_cluster(args.scenario, args.workers)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    cluster_s = time.monotonic() - began
    done, outcome = threading.Event(), {}
    markers = Path(tempfile.mkdtemp(prefix="kissray-faults-"))
    started = time.monotonic()
    job = threading.Thread(target=run_job, args=(args, markers, done, outcome))
    try:
        job.start()
        while "plan" not in outcome and not done.is_set():  # the job names its titles first
            done.wait(0.05)
        seen = disturb(cluster, nodes, args, outcome.get("plan", []), markers, done)
        job.join()
        seen["max_classifiers"] = most_at_once(actors := classifier_actors())
        seen["classifier_nodes"] = sorted({a["Address"]["NodeID"] for a in actors})
        seen["classifier_spans"] = [(a["Address"]["NodeID"][:8], a["StartTime"], a["EndTime"], a["NumRestarts"])
                                    for a in actors]
    finally:
        job_s = time.monotonic() - started
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(markers, ignore_errors=True)
    if "error" in outcome:
        raise outcome["error"]
    summary = outcome["summary"]
    print(json.dumps({"scenario": args.scenario, "wall_s": round(job_s, 2), "cluster_start_s": round(cluster_s, 2),
                      "shutdown_s": round(time.monotonic() - started - job_s, 2),
                      "n_titles": summary.n_titles, "n_ok": summary.n_ok, "n_failed": summary.n_failed,
                      "n_partial": summary.n_partial, "attempts": summary.attempts,
                      "failures": summary.failures, **seen}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
