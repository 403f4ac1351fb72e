"""The library job on a real multi-node Ray (``ray.cluster_utils.Cluster``: a head and worker
raylets on this machine) while something goes wrong mid-run; used by tests/test_cluster_faults.py
and to measure what a lost node costs.

Scenarios: ``none``; ``node_removed`` (a worker node is removed once titles have started to
finish); ``classifier_killed`` / ``writer_killed`` (the actor's process gets SIGKILL mid-run, the
writer while it holds a title's earlier rows); ``gpu_added`` (the head has no GPU, one worker a GPU
resource; a second GPU node joins mid-run and the classifier pool must grow onto it). The job
waits at a test-only hold point (:func:`hold_point`) while the harm is done, so it lands mid-run by
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

SCENARIOS = ("none", "node_removed", "classifier_killed", "writer_killed", "gpu_added")


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
                   help="gpu_added: how long the held classifier waits for the pool to grow onto the new node")
    return p


def start_cluster(scenario: str, workers: int):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1, num_gpus=1 if scenario == "gpu_added" and i == 0 else 0)
             for i in range(workers)]
    cluster.wait_for_nodes()
    return cluster, nodes


def hold_point(scenario: str, first_title: str, after_titles: int) -> tuple[str, str] | None:
    """Where the job waits (test-only hold, kissray/batch/faults.py) while the harm is done, so the
    harm lands mid-run by construction, not by the luck of a sample: ``node_removed`` once
    ``after_titles`` are committed; ``classifier_killed`` and ``gpu_added`` in the model actor
    about to score the first title (which is then not finished); ``writer_killed`` in the writer
    about to add rows to a title it holds earlier rows of (so the kill loses them)."""
    return {"node_removed": ("commit", str(after_titles)), "classifier_killed": ("classifier", first_title),
            "gpu_added": ("classifier", first_title), "writer_killed": ("writer", first_title)}.get(scenario)


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


def disturb(cluster, nodes, args, point: tuple[str, str], markers: Path, done: threading.Event) -> dict:
    """Wait until the job is held at ``point``, do the scenario's harm, then release it."""
    seen = {"action": None, "at_titles": None, "added_node": None}
    if point is None:
        done.wait()
        return {**seen, "action": "nothing"}
    held, release = markers / f"held-{point[0]}", markers / f"release-{point[0]}"
    try:
        while not done.is_set() and not held.exists():
            done.wait(0.05)
        if done.is_set():
            return seen  # the job ended without reaching the point: action None fails the test
        seen["at_titles"] = written_titles(args.out)
        seen["action"] = act(cluster, nodes, args.scenario, int(held.read_text()))
        if args.scenario == "gpu_added":  # keep the first actor busy until the pool has grown onto the new node
            deadline = time.monotonic() + args.grow_timeout_s
            seen["added_node"] = nodes[-1].node_id
            while not done.is_set() and time.monotonic() < deadline and not any(
                    a["State"] == "ALIVE" and a["Address"]["NodeID"] == seen["added_node"] for a in classifier_actors()):
                done.wait(0.2)
    finally:
        release.touch()
    return seen


def act(cluster, nodes, scenario: str, held_pid: int) -> str | None:
    if scenario == "node_removed":
        cluster.remove_node(nodes[-1], allow_graceful=False)
        return "removed a worker node"
    if scenario in ("classifier_killed", "writer_killed"):
        if held_pid not in actor_pids("Classifier" if scenario == "classifier_killed" else "TitleWriter"):
            return None  # the held process is not the stage's actor: fails the test
        os.kill(held_pid, signal.SIGKILL)
        return "SIGKILL to 1 actor(s)"
    if scenario == "gpu_added":
        nodes.append(cluster.add_node(num_cpus=1, num_gpus=1))
        return "added a GPU node"
    return "nothing"


def run_job(args, markers: Path, done: threading.Event, outcome: dict) -> None:
    """The library job, as ``kissray score`` runs it (in a thread: Cluster changes need the main one),
    with the scenario's hold point."""
    from kissray.batch.faults import FaultPlan
    from kissray.pipeline import out_lock, prepare_library, run_library
    from kissray.score import SegmentParams

    try:
        with out_lock(args.out) as lock:
            job = prepare_library([args.films], args.model, args.out, lock=lock)
            point = hold_point(args.scenario, sorted(t.title_id for t in job.titles)[0], args.after_titles)
            outcome["point"] = point
            faults = FaultPlan(hold_at=(point,), marker_dir=str(markers)) if point else FaultPlan()
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
    cluster, nodes = start_cluster(args.scenario, args.workers)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    done, outcome = threading.Event(), {}
    markers = Path(tempfile.mkdtemp(prefix="kissray-faults-"))
    started = time.monotonic()
    job = threading.Thread(target=run_job, args=(args, markers, done, outcome))
    try:
        job.start()
        while "point" not in outcome and not done.is_set():  # the job names its titles first
            done.wait(0.05)
        seen = disturb(cluster, nodes, args, outcome.get("point"), markers, done)
        job.join()
        seen["max_classifiers"] = most_at_once(actors := classifier_actors())
        seen["classifier_nodes"] = sorted({a["Address"]["NodeID"] for a in actors})
        seen["classifier_spans"] = [(a["Address"]["NodeID"][:8], a["StartTime"], a["EndTime"], a["NumRestarts"])
                                    for a in actors]
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(markers, ignore_errors=True)
    if "error" in outcome:
        raise outcome["error"]
    summary = outcome["summary"]
    print(json.dumps({"scenario": args.scenario, "wall_s": round(time.monotonic() - started, 2),
                      "n_titles": summary.n_titles, "n_ok": summary.n_ok, "n_failed": summary.n_failed,
                      "n_partial": summary.n_partial, "attempts": summary.attempts,
                      "failures": summary.failures, **seen}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
