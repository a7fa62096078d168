"""The FAISS side of the retrieval benchmark, and the shared data.

Generates clustered, L2-normalised float32 vectors (the corpus and the
queries), computes exact top-10 neighbours by inner product (the recall
reference for both sides), then builds a FAISS IndexHNSWFlat with the given M
and efConstruction on ONE thread and measures, for each efSearch, queries per
second and recall@10. Writes base.f32, queries.f32 (little-endian float32,
row-major), gt.i32 (top-10 ids per query) and faiss.json into --out.
"""

import argparse
import json
import os
import time

import numpy as np


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def clustered(rng, n, dim, centers):
    # Vectors near one of the cluster centres, like sentence embeddings of a
    # corpus with topics; then normalised (cosine = inner product).
    labels = rng.integers(0, len(centers), size=n)
    x = centers[labels] + 0.6 * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=128)
    p.add_argument("--ef-search", default="16,32,64,128,256")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    centers = rng.standard_normal((max(16, a.n // 1000), a.dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    base = clustered(rng, a.n, a.dim, centers)
    queries = clustered(rng, a.queries, a.dim, centers)
    # Exact top-10 by inner product, in blocks.
    gt = np.empty((a.queries, 10), dtype=np.int32)
    for i in range(0, a.queries, 100):
        sims = queries[i : i + 100] @ base.T
        top = np.argpartition(-sims, 10, axis=1)[:, :10]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
        gt[i : i + 100] = np.take_along_axis(top, order, axis=1)
    base.tofile(os.path.join(a.out, "base.f32"))
    queries.tofile(os.path.join(a.out, "queries.f32"))
    gt.tofile(os.path.join(a.out, "gt.i32"))

    import faiss

    faiss.omp_set_num_threads(1)
    before = rss_bytes()
    index = faiss.IndexHNSWFlat(a.dim, a.m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = a.ef_construction
    t = time.perf_counter()
    index.add(base)
    build_s = time.perf_counter() - t
    memory = rss_bytes() - before
    results = []
    for ef in [int(x) for x in a.ef_search.split(",")]:
        index.hnsw.efSearch = ef
        t = time.perf_counter()
        _, ids = index.search(queries, 10)
        dt = time.perf_counter() - t
        recall = np.mean([len(set(ids[i]) & set(gt[i])) / 10 for i in range(a.queries)])
        results.append({"ef_search": ef, "qps": a.queries / dt, "recall": float(recall)})
    out = {
        "faiss_version": faiss.__version__,
        "n": a.n,
        "build_s": build_s,
        "memory_bytes": memory,
        "results": results,
    }
    with open(os.path.join(a.out, "faiss.json"), "w") as f:
        json.dump(out, f)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
