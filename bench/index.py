"""Approximate faiss indexes against exact search at 1e5 vectors: recall@10 and queries/s.

    python bench/index.py               # 100,000 x 384-d synthetic clustered vectors
    python bench/index.py --n 20000     # quicker

Flat (exact), IVF at several nprobe and HNSW at several efSearch, built by `retrieval.index` and timed
in one process; queries are held-out vectors from the same distribution. Prints a table, then one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from icp import clustered

from retrieval.index import VectorIndex


def timed_search(index: VectorIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    _, rows = index.search(queries, k)
    return rows, len(queries) / (time.perf_counter() - start)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--clusters", type=int, default=2_000)
    parser.add_argument("--spread", type=float, default=1.5, help="noise around cluster centres (higher: harder)")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()

    data = clustered(args.n + args.queries, args.dim, args.clusters, args.spread, 0.0, seed=0)
    vectors, queries = data[:args.n], data[args.n:]
    rows_out = []

    def measure(name: str, index: VectorIndex, build: float, setting: str, truth: np.ndarray | None) -> np.ndarray:
        found, qps = timed_search(index, queries, args.k)
        r = 1.0 if truth is None else recall(found, truth)
        rows_out.append({"index": name, "setting": setting, "build_s": round(build, 1), "qps": round(qps),
                         "recall_at_10": round(r, 4)})
        return found

    t = time.perf_counter()
    flat = VectorIndex.build(vectors, kind="flat")
    truth = measure("flat", flat, time.perf_counter() - t, "exact", None)

    t = time.perf_counter()
    ivf = VectorIndex.build(vectors, kind="ivf")
    build = time.perf_counter() - t
    for nprobe in (4, 8, 16, 32, 64):
        ivf.index.nprobe = nprobe
        measure("ivf", ivf, build, f"nlist={ivf.meta.nlist} nprobe={nprobe}", truth)

    t = time.perf_counter()
    hnsw = VectorIndex.build(vectors, kind="hnsw")
    build = time.perf_counter() - t
    for ef in (16, 32, 64, 128):
        hnsw.index.hnsw.efSearch = ef
        measure("hnsw", hnsw, build, f"M=32 efSearch={ef}", truth)

    print(f"\n{args.n:,} vectors x {args.dim}-d, {args.queries:,} queries, recall@{args.k} against exact search")
    print(f"{'index':<6}{'setting':<26}{'build s':>9}{'queries/s':>11}{'recall@10':>11}")
    for row in rows_out:
        print(f"{row['index']:<6}{row['setting']:<26}{row['build_s']:>9.1f}{row['qps']:>11,}{row['recall_at_10']:>11.3f}")
    flat_qps = rows_out[0]["qps"]
    for row in rows_out:
        row["speedup_vs_flat"] = round(row["qps"] / flat_qps, 2)
    print(json.dumps({"n": args.n, "dim": args.dim, "queries": args.queries, "results": rows_out}))


if __name__ == "__main__":
    main()
