"""Score once, ask again (SPEC 11): what stored embeddings buy, measured.

Part 1, on one running local Ray (start-up excluded for every job), a library of ``--titles``
generated films (one film hard-linked under N names: every title is decoded for real):
  score_s            ``kissray score --embeddings`` with the checkpoint CK (the library's one scoring run)
  score_new_head_s   ``kissray score`` with CK2 (CK's backbones, a new head): what a new question
                     costs without embeddings
  rescore_s          ``kissray rescore --embeddings`` with CK2: the same tables, no decoding
  speed-up           score_new_head_s / rescore_s; rescore throughput in scored hours per second;
                     max |dp| between the two CK2 outputs; embeddings bytes per scored hour
Part 2, ``kissray similar`` at ``--vectors`` clustered unit vectors of 640 dims (an av checkpoint's
embedding), float16 as stored: brute force (kissray.similar's scan) against the faiss IVF index
kissray builds and a usearch HNSW index (when usearch is importable): build time, mean query
time over ``--queries`` queries, recall@10 against brute force.

  python benchmarks/embeddings.py --seconds 60 --skip-similar --json benchmarks/results/embeddings-score.json
  python benchmarks/embeddings.py --skip-score --vectors 100000 --json benchmarks/results/embeddings-100k.json
  python benchmarks/embeddings.py --skip-score --skip-usearch --json benchmarks/results/embeddings-1m.json
  python benchmarks/embeddings.py --quick                                          # a minute or two
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from many_titles import make_titles  # noqa: E402
from throughput import start_ray, timed, versions, write_json  # noqa: E402

DIM = 640  # ResNet-18 (512) + VGGish (128)
TOP_K = 10


# ---------------------------------------------------------------- part 1: score vs rescore


def connect_ray(address: str) -> float:
    """Join a running cluster (``--address``): its start-up was paid before; returns the connect time."""
    import logging

    import ray

    start = time.perf_counter()
    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    return time.perf_counter() - start


def make_checkpoints(work: str, size: int) -> tuple[str, str]:
    """CK (random backbones, untrained head) and CK2 (the same backbones, another head)."""
    import torch

    from kissray.model import ModelConfig, init_model, save_model

    model = init_model(ModelConfig(labels=["kiss"], image_size=size), seed=0)
    ck, ck2 = os.path.join(work, "ck"), os.path.join(work, "ck2")
    save_model(model, ck)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=torch.Generator().manual_seed(1)))
    save_model(model, ck2)
    return ck, ck2


def score_vs_rescore(args, work: str) -> dict:
    import pandas as pd

    from kissray.batch.rescore import rescore_library
    from kissray.pipeline import prepare_library, run_library

    folder = make_titles(work, args.titles, args.seconds, 320, 180)
    ck, ck2 = make_checkpoints(work, args.size)
    outs = {name: os.path.join(work, name) for name in ("scored", "scored-ck2", "rescored")}

    def score(model: str, out: str, embeddings: bool):
        summary = run_library(prepare_library([folder], model, out, embeddings=embeddings),
                              batch_size=args.batch_size, progress=False)
        assert summary.all_ok, str(summary)
        return summary

    score_s, summary = timed(score, ck, outs["scored"], True)
    score_new_head_s, _ = timed(score, ck2, outs["scored-ck2"], False)
    rescore_s, rescored = timed(rescore_library, outs["scored"], ck2, outs["rescored"], progress=False)
    assert rescored.all_ok, str(rescored)
    a, b = (pd.read_parquet(os.path.join(outs[n], "scores")).sort_values(["title_id", "second"])
            for n in ("scored-ck2", "rescored"))
    scored_hours = summary.seconds_scored / 3600
    embeddings_bytes = sum(os.path.getsize(os.path.join(outs["scored"], "embeddings", f))
                           for f in os.listdir(os.path.join(outs["scored"], "embeddings")))
    return {"titles": args.titles, "title_seconds": args.seconds, "size": args.size,
            "scored_seconds": summary.seconds_scored, "score_s": score_s, "score_new_head_s": score_new_head_s,
            "rescore_s": rescore_s, "speedup": score_new_head_s / rescore_s,
            "rescore_scored_hours_per_s": scored_hours / rescore_s,
            "max_abs_dp": float(np.abs(a.p.to_numpy() - b.p.to_numpy()).max()),
            "embeddings_bytes": embeddings_bytes, "embeddings_bytes_per_scored_hour": embeddings_bytes / scored_hours}


# ---------------------------------------------------------------- part 2: similar, brute vs index


def clustered(n: int, n_clusters: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, DIM)).astype(np.float32)
    out = np.empty((n, DIM), np.float16)
    for lo in range(0, n, 100_000):  # in slices: float32 of 1M x 640 alone is 2.6 GB
        hi = min(n, lo + 100_000)
        x = centres[rng.integers(0, n_clusters, hi - lo)] + 0.35 * rng.normal(size=(hi - lo, DIM)).astype(np.float32)
        out[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def recall(found: list[np.ndarray], truth: list[np.ndarray]) -> float:
    return float(np.mean([len(set(f[:TOP_K].tolist()) & set(t.tolist())) / TOP_K for f, t in zip(found, truth)]))


def similar_at_scale(args) -> dict:
    from kissray.similar import DEFAULT_NPROBE, _BruteForce, ivf_index, unit

    vectors = clustered(args.vectors, max(1, args.vectors // 200))
    rng = np.random.default_rng(1)
    queries = unit(vectors[rng.choice(len(vectors), args.queries, replace=False)].astype(np.float32)
                   + rng.normal(0, 0.02, (args.queries, DIM)).astype(np.float32))
    r = {"vectors": args.vectors, "dim": DIM, "queries": args.queries, "stored_bytes": int(vectors.nbytes)}
    keys = np.zeros(len(vectors), object)
    r["brute_load_s"], brute = timed(_BruteForce, None, None, keys, keys, vectors)
    start = time.perf_counter()
    truth = [rows for rows, _ in (brute.nearest(q, TOP_K) for q in queries)]
    r["brute_query_ms"] = 1000 * (time.perf_counter() - start) / args.queries
    del brute
    r["faiss_build_s"], index = timed(ivf_index, vectors)
    index.nprobe = DEFAULT_NPROBE
    start = time.perf_counter()
    found = [index.search(q[None, :], TOP_K)[1][0] for q in queries]
    r["faiss_query_ms"] = 1000 * (time.perf_counter() - start) / args.queries
    r["faiss_recall_at_10"], r["faiss_nlist"], r["faiss_nprobe"] = recall(found, truth), index.nlist, DEFAULT_NPROBE
    del index
    if args.skip_usearch:
        return r
    try:
        from usearch.index import Index
    except ImportError:
        r["usearch"] = "not installed"
        return r
    index = Index(ndim=DIM, metric="ip", dtype="f16", connectivity=16)
    start = time.perf_counter()
    for lo in range(0, len(vectors), 100_000):
        index.add(np.arange(lo, min(len(vectors), lo + 100_000)), unit(vectors[lo:lo + 100_000]))
    r["usearch_build_s"] = time.perf_counter() - start
    start = time.perf_counter()
    found = [index.search(q, TOP_K).keys for q in queries]
    r["usearch_query_ms"] = 1000 * (time.perf_counter() - start) / args.queries
    r["usearch_recall_at_10"] = recall(found, truth)
    return r


def table(r: dict) -> str:
    rows = []
    s = r.get("score")
    if s:
        rows += [f"{s['titles']} titles x {s['title_seconds']} s, {s['size']} px stills "
                 f"({s['scored_seconds']} scored seconds)", "",
                 "| job | wall s |", "|---|---:|",
                 f"| score --embeddings (CK) | {s['score_s']:.1f} |", f"| score (CK2) | {s['score_new_head_s']:.1f} |",
                 f"| rescore (CK2) | {s['rescore_s']:.2f} |", "",
                 f"speed-up {s['speedup']:.0f}x; rescore {s['rescore_scored_hours_per_s']:.2f} scored hours/s; "
                 f"max |dp| {s['max_abs_dp']:.1e}; embeddings {s['embeddings_bytes_per_scored_hour'] / 1e6:.2f} "
                 f"MB per scored hour", ""]
    v = r.get("similar")
    if v:
        rows += [f"{v['vectors']} clustered vectors x {v['dim']} dims (float16: {v['stored_bytes'] / 1e9:.2f} GB), "
                 f"{v['queries']} queries", "", "| search | build s | query ms | recall@10 |", "|---|---:|---:|---:|",
                 f"| brute force | {v['brute_load_s']:.1f} (load) | {v['brute_query_ms']:.1f} | 1.000 |",
                 f"| faiss IVF fp16 ({v['faiss_nlist']} lists, nprobe {v['faiss_nprobe']}) | {v['faiss_build_s']:.1f} "
                 f"| {v['faiss_query_ms']:.2f} | {v['faiss_recall_at_10']:.3f} |"]
        if "usearch_build_s" in v:
            rows.append(f"| usearch HNSW f16 (M=16) | {v['usearch_build_s']:.1f} | {v['usearch_query_ms']:.2f} "
                        f"| {v['usearch_recall_at_10']:.3f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="20 x 10-s titles, 20k vectors")
    p.add_argument("--titles", type=int, default=20)
    p.add_argument("--seconds", type=int, default=120, help="length of each title")
    p.add_argument("--size", type=int, default=112, help="still size of the checkpoints, px")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    p.add_argument("--vectors", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--skip-score", action="store_true", help="only part 2")
    p.add_argument("--skip-similar", action="store_true", help="only part 1")
    p.add_argument("--skip-usearch", action="store_true",
                   help="no usearch comparison (its HNSW build takes ~an hour per million vectors on 2 cores)")
    p.add_argument("--address", default=None,
                   help="a running Ray cluster to use (its GCS address) instead of starting a local Ray")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.vectors, args.size = 10, 20_000, 64
    work = args.workdir or tempfile.mkdtemp(prefix="kissray-embeddings-bench-")
    result = {"versions": versions(), "args": vars(args)}
    try:
        if not args.skip_score:
            result["ray_start_s"] = connect_ray(args.address) if args.address else start_ray(args.threads)
            try:
                result["score"] = score_vs_rescore(args, work)
            finally:
                import ray

                ray.shutdown()
        if not args.skip_similar:
            result["similar"] = similar_at_scale(args)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(table(result))
    write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
