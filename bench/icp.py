"""In-Context Pretraining ordering at scale: kNN + dedup + traversal over synthetic clustered embeddings.

    python bench/icp.py                 # 1,000,000 x 384-d, k=10
    python bench/icp.py --n 100000      # a quicker look

Embedding time is excluded (the vectors are generated here). Prints the time of each phase, peak
memory (RSS), and kNN recall@10 of the approximate index against exact search on a sample, then one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.index import VectorIndex, exact_knn, self_knn
from train.icp import adjacent_similarity, greedy_order, knn_graph, near_duplicates


def clustered(n: int, dim: int, clusters: int, spread: float, duplicates: float, seed: int) -> np.ndarray:
    """Unit vectors around `clusters` centres (sizes vary) that are themselves grouped into topics,
    so neighbouring clusters overlap as related subjects do; plus a share of near-copies."""
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((max(1, clusters // 100), dim)).astype(np.float32)
    centres = topics[rng.integers(0, len(topics), clusters)] + rng.standard_normal((clusters, dim)).astype(np.float32)
    sizes = rng.dirichlet(np.full(clusters, 2.0))
    labels = rng.choice(clusters, size=n, p=sizes)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(start + 100_000, n)
        noise = rng.standard_normal((stop - start, dim)).astype(np.float32) * spread
        out[start:stop] = centres[labels[start:stop]] + noise
    copies = rng.choice(n, size=int(duplicates * n), replace=False)
    out[copies[: len(copies) // 2]] = out[copies[len(copies) // 2:]] + 0.01 * rng.standard_normal(
        (len(copies) // 2, dim)).astype(np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--clusters", type=int, default=20_000)
    parser.add_argument("--spread", type=float, default=1.0, help="noise scale around a cluster centre")
    parser.add_argument("--duplicates", type=float, default=0.01, help="share of documents made near-copies")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--dedup", type=float, default=0.95)
    parser.add_argument("--nprobe", type=int, default=None)
    parser.add_argument("--sample", type=int, default=2000, help="queries for the recall check")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    t0 = time.perf_counter()
    vectors = clustered(args.n, args.dim, args.clusters, args.spread, args.duplicates, args.seed)
    generate = time.perf_counter() - t0
    phases: dict[str, float] = {}

    t = time.perf_counter()
    index = VectorIndex.build(vectors, kind="auto", nprobe=args.nprobe)
    phases["index build"] = time.perf_counter() - t
    t = time.perf_counter()
    sims, rows = self_knn(vectors, args.k, index=index, progress=True)
    phases["kNN search"] = time.perf_counter() - t
    t = time.perf_counter()
    keep = near_duplicates(sims, rows, args.dedup)
    phases["dedup"] = time.perf_counter() - t
    t = time.perf_counter()
    graph = knn_graph(sims, rows, keep)
    phases["graph"] = time.perf_counter() - t
    t = time.perf_counter()
    order = greedy_order(graph, keep, progress=True)
    phases["traversal"] = time.perf_counter() - t
    total = sum(phases.values())

    assert len(order) == keep.sum() and len(np.unique(order)) == len(order), "not a permutation of the kept documents"
    sample = np.random.default_rng(args.seed + 1).choice(args.n, size=min(args.sample, args.n), replace=False)
    _, truth = exact_knn(vectors, vectors[sample], args.k + 1)
    truth_sets = [set(r.tolist()) - {int(q)} for r, q in zip(truth, sample)]
    recall = float(np.mean([len(truth_sets[i] & set(rows[q].tolist())) / args.k for i, q in enumerate(sample)]))
    random_order = np.random.default_rng(args.seed).permutation(np.flatnonzero(keep))
    result = {
        "n": args.n, "dim": args.dim, "k": args.k, "index": index.meta.kind, "nlist": index.meta.nlist,
        "nprobe": index.meta.nprobe, "seconds": {k: round(v, 2) for k, v in phases.items()},
        "total_seconds": round(total, 1), "generate_seconds": round(generate, 1), "peak_rss_gib": round(peak_gib(), 2),
        "recall_at_10": round(recall, 4), "duplicates_removed": int((~keep).sum()),
        "mean_degree": round(float(graph.degree[keep].mean()), 2),
        "adjacent_cosine_ordered": round(adjacent_similarity(vectors, order), 4),
        "adjacent_cosine_random": round(adjacent_similarity(vectors, random_order), 4),
    }
    print(f"\n{'phase':<14}{'seconds':>10}")
    for name, seconds in phases.items():
        print(f"{name:<14}{seconds:>10.1f}")
    print(f"{'total':<14}{total:>10.1f}   (target <= 900 s; embedding excluded, generation {generate:.0f} s)")
    print(f"peak RSS {result['peak_rss_gib']} GiB   recall@{args.k} {recall:.3f} (target >= 0.9)   "
          f"index {index.meta.kind} nlist={index.meta.nlist} nprobe={index.meta.nprobe}")
    print(f"removed {result['duplicates_removed']} near-duplicates; adjacent cosine ordered "
          f"{result['adjacent_cosine_ordered']} vs random {result['adjacent_cosine_random']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
