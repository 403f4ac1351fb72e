"""The library job on a real multi-node Ray (``ray.cluster_utils.Cluster``: a head and worker
raylets on this machine) while something goes wrong mid-run; used by tests/test_cluster_faults.py
and to measure what a lost node costs.

Scenarios: ``none``; ``node_removed`` (a worker node is removed once titles have started to
finish); ``classifier_killed`` / ``writer_killed`` (the actor's process gets SIGKILL mid-run);
``gpu_added`` (the head has no GPU, one worker a GPU resource; a second GPU node joins mid-run and
the classifier pool must grow onto it). Prints one JSON object: the run's summary, the largest
number of classifier actors seen alive at once, and what was done to the cluster.

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
    p.add_argument("--scenario", choices=SCENARIOS, default="none")
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


def actor_pids(name: str) -> list[int]:
    """Pids of this cluster's live Ray Data actors for the stage ``name`` (Classifier, TitleWriter),
    from the GCS actor table (class ``MapWorker(MapBatches(<name>))``). A process title is no guide:
    an actor busy with a batch is titled after the method it runs, so a busy classifier was missed."""
    import ray._private.state

    actors = ray._private.state.actors().values()
    return sorted(int(a["Pid"]) for a in actors
                  if a["State"] == "ALIVE" and a["Pid"] and f"MapBatches({name})" in a["ActorClassName"])


def written_titles(out: str) -> int:
    folder = Path(out) / "titles"
    return sum(p.suffix == ".parquet" and not p.name.startswith(".") for p in folder.iterdir()) if folder.is_dir() else 0


def disturb(cluster, nodes, scenario: str, out: str, after_titles: int, done: threading.Event) -> dict:
    """Wait until ``after_titles`` are written, then do the scenario's harm; returns what was done."""
    seen = {"max_classifiers": 0, "action": None, "at_titles": None}
    while not done.is_set():
        seen["max_classifiers"] = max(seen["max_classifiers"], len(actor_pids("Classifier")))
        if seen["action"] is None and written_titles(out) >= after_titles:
            seen["at_titles"] = written_titles(out)
            seen["action"] = act(cluster, nodes, scenario)  # None: nothing to act on yet
        done.wait(0.5)
    return seen


def act(cluster, nodes, scenario: str) -> str:
    if scenario == "node_removed":
        cluster.remove_node(nodes[-1], allow_graceful=False)
        return "removed a worker node"
    if scenario in ("classifier_killed", "writer_killed"):
        pids = actor_pids("Classifier" if scenario == "classifier_killed" else "TitleWriter")
        for pid in pids[:1]:
            os.kill(pid, signal.SIGKILL)
        return f"SIGKILL to {len(pids[:1])} actor(s)" if pids else None  # none up yet: try again
    if scenario == "gpu_added":
        cluster.add_node(num_cpus=1, num_gpus=1)
        return "added a GPU node"
    return "nothing"


def run_job(args, done: threading.Event, outcome: dict) -> None:
    """The library job, as ``kissray score`` runs it (in a thread: Cluster changes need the main one)."""
    from kissray.pipeline import out_lock, prepare_library, run_library
    from kissray.score import SegmentParams

    try:
        with out_lock(args.out) as lock:
            job = prepare_library([args.films], args.model, args.out, lock=lock)
            outcome["summary"] = run_library(job, params=SegmentParams(threshold=0.47, min_len=3, min_fraction=0.6),
                                             window_s=args.window_s, batch_size=args.batch_size,
                                             decode_timeout_s=60, progress=False)
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
    started = time.monotonic()
    job = threading.Thread(target=run_job, args=(args, done, outcome))
    try:
        job.start()
        seen = disturb(cluster, nodes, args.scenario, args.out, args.after_titles, done)
        job.join()
    finally:
        ray.shutdown()
        cluster.shutdown()
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
