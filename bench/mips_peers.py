"""Benchmark: triptych's ClusterIndex against faiss, hnswlib and ScaNN for MIPS on GloVe 6B 50-d.

GloVe-390k indexed, 10,000 held-out words as queries (seed 0), top 10 by inner product, the same exact ground
truth for everyone (triptych's ExactIndex; faiss IndexFlatIP is timed as a peer). Each method sweeps its
search knob; we report recall@10 against queries per second (whole query batch, wall clock, 2 threads),
build time, serialized index size, the Pareto curves, and the QPS at recall@10 = 0.9 and 0.95 read off each
method's Pareto front by linear interpolation between its two neighbouring front points.

Peers (each skipped when its package is absent; ``pip install triptych[bench]``):

- faiss ``IndexFlatIP`` (exact), ``IndexIVFFlat`` with ``METRIC_INNER_PRODUCT`` over ``nprobe`` (its coarse
  quantizer is k-means, the closest peer), and the same IVF on the exact one-column reduced vectors
  ``[x/M, sqrt(1 − ‖x/M‖²)]`` / ``[q/‖q‖, 0]`` (Simple-LSH form: inner product there is cosine-ordered MIPS);
- hnswlib, ``space="ip"``, over ``ef``;
- ScaNN, tree + anisotropic asymmetric hashing + exact re-ranking, over ``leaves_to_search``.

Usage::

    python bench/mips_peers.py                 # the real run (minutes; the lead runs it on a quiet machine)
    python bench/mips_peers.py --smoke         # 20k items, 300 queries: seconds, checks the plumbing

Writes ``results/mips/peers.md``, ``peers.json`` and ``peers.png`` (``--out`` changes the folder).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch

from triptych._io import atomic_write_text
from triptych.data.vectors import load_glove
from triptych.experiments.report import environment, markdown_table, save_figure, to_json
from triptych.mips import ClusterIndex
from triptych.mips.baselines import ExactIndex
from triptych.mips.metrics import interpolate_at, pareto_front, recall_at_k
from triptych.mips.reductions import simple_lsh_items, simple_lsh_queries

log = logging.getLogger("mips_peers")
K = 10
RECALL_TARGETS = (0.9, 0.95)


@dataclass
class MethodResult:
    """One method: its build cost and one (setting, recall@10, QPS) point per search setting."""

    name: str
    build_s: float
    index_bytes: int | None
    knob: str
    clusters: int | None = None
    points: list[dict[str, float]] = field(default_factory=list)


def _timed(search: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    ids = search()
    return ids, time.perf_counter() - start


def _sweep(result: MethodResult, settings: Iterable[int], search: Callable[[int], np.ndarray],
           true_ids: np.ndarray) -> MethodResult:
    n = true_ids.shape[0]
    settings = list(settings)
    search(settings[0])  # warm-up: first-call allocations and thread start-up are not search time
    for setting in settings:
        ids, seconds = _timed(lambda s=setting: search(s))
        point = {"setting": setting, "recall@10": recall_at_k(ids, true_ids, K), "qps": n / seconds}
        result.points.append(point)
        log.info("%s %s=%s: recall@10 %.4f, %.0f QPS", result.name, result.knob, setting, point["recall@10"],
                 point["qps"])
        if point["recall@10"] >= 0.999:
            break  # the rest of the sweep can only be slower at the same recall
    return result


def _file_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _powers_of_two(limit: int) -> list[int]:
    return [1 << i for i in range(int(math.log2(max(limit, 1))) + 1)]


# ----------------------------------------------------------------------------------------------------------------
# Methods


def bench_triptych(items: torch.Tensor, queries: torch.Tensor, true_ids: np.ndarray, levels: int,
                   tmp: Path) -> MethodResult:
    start = time.perf_counter()
    index = ClusterIndex(items.shape[1], levels=levels, seed=0).train(items)
    index.add(items)
    build_s = time.perf_counter() - start
    path = tmp / f"triptych_{levels}.tpx"
    index.save(path)
    result = MethodResult(f"triptych ClusterIndex ({levels} level{'s' if levels > 1 else ''}, "
                          f"{index.n_leaves} leaves)", build_s, _file_bytes(path), "branches", index.n_leaves)
    settings = _powers_of_two(index.n_leaves // 4 if levels == 1 else 128)
    return _sweep(result, settings, lambda b: index.search(queries, K, branches=b)[1], true_ids)


def bench_faiss_flat(items: np.ndarray, queries: np.ndarray, true_ids: np.ndarray) -> MethodResult:
    import faiss

    start = time.perf_counter()
    index = faiss.IndexFlatIP(items.shape[1])
    index.add(items)
    result = MethodResult("faiss IndexFlatIP (exact)", time.perf_counter() - start,
                          faiss.serialize_index(index).nbytes, "-")
    return _sweep(result, [0], lambda _: index.search(queries, K)[1], true_ids)


def bench_faiss_ivf(items: np.ndarray, queries: np.ndarray, true_ids: np.ndarray, nlist: int,
                    reduced: bool) -> MethodResult:
    import faiss

    if reduced:
        items = simple_lsh_items(torch.from_numpy(items)).numpy()
        queries = simple_lsh_queries(torch.from_numpy(queries)).numpy()
    start = time.perf_counter()
    quantizer = faiss.IndexFlatIP(items.shape[1])
    index = faiss.IndexIVFFlat(quantizer, items.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(items)
    index.add(items)
    name = "faiss IVFFlat IP" + (" on reduced vectors" if reduced else "")
    result = MethodResult(f"{name} (nlist={nlist})", time.perf_counter() - start,
                          faiss.serialize_index(index).nbytes, "nprobe")

    def search(nprobe: int) -> np.ndarray:
        index.nprobe = nprobe
        return index.search(queries, K)[1]

    return _sweep(result, _powers_of_two(nlist // 2), search, true_ids)


def bench_hnswlib(items: np.ndarray, queries: np.ndarray, true_ids: np.ndarray, threads: int,
                  tmp: Path) -> MethodResult:
    import hnswlib

    start = time.perf_counter()
    index = hnswlib.Index(space="ip", dim=items.shape[1])
    index.init_index(max_elements=items.shape[0], M=16, ef_construction=200, random_seed=0)
    index.set_num_threads(threads)
    index.add_items(items, np.arange(items.shape[0]))
    build_s = time.perf_counter() - start
    path = tmp / "hnsw.bin"
    index.save_index(str(path))
    result = MethodResult("hnswlib ip (M=16, efC=200)", build_s, _file_bytes(path), "ef")

    def search(ef: int) -> np.ndarray:
        index.set_ef(max(ef, K))
        return index.knn_query(queries, k=K)[0].astype(np.int64)

    return _sweep(result, [10, 20, 40, 80, 160, 320, 640], search, true_ids)


def bench_scann(items: np.ndarray, queries: np.ndarray, true_ids: np.ndarray, n_leaves: int, threads: int,
                tmp: Path) -> MethodResult:
    from scann.scann_ops.py import scann_ops_pybind

    start = time.perf_counter()
    builder = scann_ops_pybind.builder(items, K, "dot_product").tree(
        num_leaves=n_leaves, num_leaves_to_search=max(1, n_leaves // 20),
        training_sample_size=min(items.shape[0], 250_000)).score_ah(
        2, anisotropic_quantization_threshold=0.2).reorder(250)
    builder.set_n_training_threads(threads)
    searcher = builder.build()
    build_s = time.perf_counter() - start
    searcher.set_num_threads(threads)
    path = tmp / "scann"
    path.mkdir()
    searcher.serialize(str(path))
    result = MethodResult(f"ScaNN tree+AH+reorder (leaves={n_leaves})", build_s, _file_bytes(path),
                          "leaves_to_search")

    def search(leaves: int) -> np.ndarray:
        return searcher.search_batched_parallel(queries, leaves_to_search=leaves)[0].astype(np.int64)

    return _sweep(result, _powers_of_two(n_leaves // 2), search, true_ids)


# ----------------------------------------------------------------------------------------------------------------
# Report


def summarise(result: MethodResult, exact_qps: float) -> dict[str, Any]:
    qps = [p["qps"] for p in result.points]
    recall = [p["recall@10"] for p in result.points]
    front = pareto_front(qps, recall)
    summary = {"name": result.name, "build_s": result.build_s, "index_bytes": result.index_bytes,
               "knob": result.knob, "points": result.points, "pareto": front.tolist()}
    for target in RECALL_TARGETS:
        at = interpolate_at(qps, recall, target)
        summary[f"qps@{target}"] = at
        summary[f"speedup@{target}"] = None if at is None else at / exact_qps
    return summary


def _figure(summaries: list[dict[str, Any]], out_dir: Path) -> str:
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for summary in summaries:
        points = summary["points"]
        front = [points[i] for i in summary["pareto"]]
        line, = ax.plot([p["recall@10"] for p in front], [p["qps"] for p in front], "-o", markersize=4,
                        label=summary["name"])
        ax.plot([p["recall@10"] for p in points], [p["qps"] for p in points], ".", color=line.get_color(),
                alpha=0.4)
    for target in RECALL_TARGETS:
        ax.axvline(target, color="grey", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("recall@10")
    ax.set_ylabel("queries per second (log)")
    ax.set_title("MIPS on GloVe: recall@10 vs QPS (Pareto fronts; dots: all settings)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, out_dir, "peers.png")


def targets_section(summaries: list[dict[str, Any]], exact_qps: float) -> str:
    """The issue's targets, computed from this run: QPS at recall@10 = 0.9 and build time."""
    ours = [s for s in summaries if s["name"].startswith("triptych")]
    peers = [s for s in summaries if not s["name"].startswith("triptych")]
    lines = ["## Targets", ""]
    best_ours = max((s["qps@0.9"] or 0.0 for s in ours), default=0.0)
    best_peer = max(peers, key=lambda s: s["qps@0.9"] or 0.0, default=None)
    peer_qps = (best_peer["qps@0.9"] or 0.0) if best_peer else 0.0
    ratio = best_ours / exact_qps
    lines.append(f"- QPS at recall@10 = 0.9 ≥ 10× exact search: **{'met' if ratio >= 10 else 'missed'}** "
                 f"(triptych {best_ours:.0f} QPS = {ratio:.1f}× exact {exact_qps:.0f} QPS)")
    if best_peer:
        lines.append(f"- QPS at recall@10 = 0.9 ≥ the best peer: **{'met' if best_ours >= peer_qps else 'missed'}** "
                     f"(best peer {best_peer['name']}: {peer_qps:.0f} QPS)")
    ivf = next((s for s in peers if s["name"].startswith("faiss IVFFlat IP (")), None)
    one_level = next((s for s in ours if "1 level" in s["name"]), None)
    if ivf and one_level:
        build_ratio = one_level["build_s"] / ivf["build_s"]
        lines.append(f"- build time ≤ 2× faiss IVF train+add at the same number of clusters: "
                     f"**{'met' if build_ratio <= 2 else 'missed'}** ({one_level['build_s']:.1f} s vs "
                     f"{ivf['build_s']:.1f} s, {build_ratio:.1f}×)")
    return "\n".join(lines)


def _fmt(value: float | None, digits: str = ".0f") -> str:
    return "not reached" if value is None else format(value, digits)


def write_outputs(summaries: list[dict[str, Any]], meta: dict[str, Any], out_dir: Path) -> None:
    figure = _figure(summaries, out_dir)
    exact_qps = meta["exact_qps"]
    rows = [[s["name"], f"{s['build_s']:.1f}", _fmt(s["index_bytes"] and s["index_bytes"] / 2**20, ".1f"),
             f"{max(p['recall@10'] for p in s['points']):.4f}",
             *[_fmt(s[f"qps@{t}"]) + ("" if s[f"qps@{t}"] is None else f" ({s[f'speedup@{t}']:.1f}×)")
               for t in RECALL_TARGETS]]
            for s in summaries]
    table = markdown_table(["method", "build s", "index MiB", "best recall@10",
                            *[f"QPS at recall@10 = {t} (× exact)" for t in RECALL_TARGETS]], rows)
    points = "\n\n".join(
        f"**{s['name']}** ({s['knob']}):\n\n" + markdown_table(
            [s["knob"], "recall@10", "QPS"], [[p["setting"], f"{p['recall@10']:.4f}", f"{p['qps']:.0f}"]
                                              for p in s["points"]]) for s in summaries)
    env = meta["environment"]
    setup = "\n".join([
        f"- data: {meta['n_items']:,} GloVe 6B 50-d items, {meta['n_queries']:,} held-out query words, k = {K}; "
        f"ground truth: exact top 10 (triptych ExactIndex), the same for every method",
        f"- exact reference: triptych ExactIndex {exact_qps:.0f} QPS (speedups below are QPS / this)",
        f"- command: `{meta['command']}`",
        f"- threads: {meta['threads']} (torch, faiss OpenMP, hnswlib, ScaNN); CPU: {env['machine']['cpu']} "
        f"({env['machine']['cpu_count']} logical CPUs); git commit `{env['git_commit']}`; date {env['date']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        "- QPS at a recall target is read off the method's Pareto front, linearly interpolated between the two "
        "front points around the target (\"not reached\": no setting got there). Index size is the "
        "serialized index.",
    ])
    text = "\n\n".join(["# MIPS peers benchmark: recall@10 vs queries per second on GloVe", setup, "## Summary",
                         table, targets_section(summaries, exact_qps), f"![recall vs QPS]({figure})",
                         "## Every setting", points])
    atomic_write_text(out_dir / "peers.md", text + "\n")
    atomic_write_text(out_dir / "peers.json", to_json({**meta, "methods": summaries}))


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="20k items, 300 queries: a plumbing check")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results/mips"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    items_t, queries_t = load_glove(n_queries=10_000, seed=0)
    if args.smoke:
        items_t, queries_t = items_t[:20_000].contiguous(), queries_t[:300].contiguous()
    items, queries = items_t.numpy(), queries_t.numpy()
    exact = ExactIndex(items.shape[1]).add(items_t)
    (_, true_ids), exact_s = _timed(lambda: exact.search(queries_t, K))
    exact_qps = queries.shape[0] / exact_s
    summaries = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ours = bench_triptych(items_t, queries_t, true_ids, 1, tmp)
        summaries.append(summarise(ours, exact_qps))
        nlist = ours.clusters  # the partitioning peers use as many clusters as we do
        runs: list[tuple[str, Callable[[], MethodResult]]] = [
            ("triptych", lambda: bench_triptych(items_t, queries_t, true_ids, 2, tmp)),
            ("faiss", lambda: bench_faiss_flat(items, queries, true_ids)),
            ("faiss", lambda: bench_faiss_ivf(items, queries, true_ids, nlist, reduced=False)),
            ("faiss", lambda: bench_faiss_ivf(items, queries, true_ids, nlist, reduced=True)),
            ("hnswlib", lambda: bench_hnswlib(items, queries, true_ids, args.threads, tmp)),
            ("scann", lambda: bench_scann(items, queries, true_ids, nlist, args.threads, tmp)),
        ]
        if importlib.util.find_spec("faiss") is not None:
            import faiss

            faiss.omp_set_num_threads(args.threads)
        for package, run in runs:
            if importlib.util.find_spec(package) is None:
                log.warning("%s is not installed: skipped (pip install triptych[bench])", package)
                continue
            summaries.append(summarise(run(), exact_qps))
    meta = {"command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
            "smoke": args.smoke, "threads": args.threads, "n_items": items.shape[0], "n_queries": queries.shape[0],
            "exact_s": exact_s, "exact_qps": exact_qps, "environment": environment()}
    args.out.mkdir(parents=True, exist_ok=True)
    write_outputs(summaries, meta, args.out)
    log.info("wrote %s", args.out / "peers.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
