"""``triptych mips build|search|eval``: build a clustering MIPS index from a ``.npy`` file, query it, evaluate it.

    triptych mips build vectors.npy -o index.tpx [--levels L] [--clusters C] [--seed S]
    triptych mips search index.tpx queries.npy -k 10 -o out.npz [--branches B]
    triptych mips eval index.tpx queries.npy [--ground-truth ids.npy] -k 10 [--branches B]

``search`` writes ``scores`` ``(n, k)`` float32 and ``ids`` ``(n, k)`` int64 to an ``.npz``. ``eval`` prints
recall@k against the given ground-truth ids (``(n, ≥k)``, best first) or, without one, against the index's own
exact answer (every leaf probed), with queries per second and dot products per query.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from typing import Any

import numpy as np
import torch

from triptych import _io
from triptych.mips.index import ClusterIndex


def _load_matrix(path: str, what: str) -> np.ndarray:
    """A ``.npy`` matrix ``(N, d)``."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {what} from {path}: {error}") from error
    if array.ndim != 2:
        raise ValueError(f"{what} in {path} must be a matrix (N, d), got shape {array.shape}")
    return array


class _TqdmProgress:
    """A ``progress(stage, done, total)`` callback drawing one tqdm bar per stage on stderr."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, file=sys.stderr, leave=True)
        bar.n = done + 1
        bar.refresh()
        if done + 1 >= total:
            bar.close()


def _threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        torch.set_num_threads(args.threads)


def _build(args: argparse.Namespace) -> int:
    _threads(args)
    vectors = _load_matrix(args.vectors, "vectors")
    started = time.perf_counter()
    index = ClusterIndex(vectors.shape[1], levels=args.levels, n_clusters=args.clusters, reduction=args.reduction,
                         seed=args.seed, progress=_TqdmProgress(args.quiet))
    index.train(vectors).add(vectors)
    path = index.save(args.output)
    print(f"built {index!r} in {time.perf_counter() - started:.2f} s; wrote {path}")
    return 0


def _search(args: argparse.Namespace) -> int:
    _threads(args)
    index = ClusterIndex.load(args.index)
    queries = _load_matrix(args.queries, "queries")
    scores, ids, stats = index.search(queries, args.k, branches=args.branches, return_stats=True)
    buffer = io.BytesIO()
    np.savez(buffer, scores=scores, ids=ids)
    _io.atomic_write_bytes(args.output, buffer.getvalue())
    print(f"searched {stats.n_queries} queries in {stats.seconds:.3f} s "
          f"({stats.n_queries / max(stats.seconds, 1e-12):.0f} QPS); wrote {args.output}")
    return 0


def _recall(found: np.ndarray, true: np.ndarray) -> float:
    """Mean fraction of the true top-k ids found, ``(n, k)`` each; padding ``-1`` never matches."""
    hits = (found[:, :, None] == true[:, None, :]) & (true[:, None, :] >= 0)
    return float(hits.any(axis=2).sum(axis=1).mean() / true.shape[1])


def _eval(args: argparse.Namespace) -> int:
    _threads(args)
    index = ClusterIndex.load(args.index)
    queries = _load_matrix(args.queries, "queries")
    if args.ground_truth is not None:
        true = _load_matrix(args.ground_truth, "ground-truth ids")
        if true.shape[0] != queries.shape[0] or true.shape[1] < args.k:
            raise ValueError(f"ground-truth ids must have shape ({queries.shape[0]}, >= {args.k}), "
                             f"got {true.shape}")
        true = np.asarray(true[:, :args.k], dtype=np.int64)
    else:
        true = index.search(queries, args.k, branches=index.n_leaves)[1]
    _, found, stats = index.search(queries, args.k, branches=args.branches, return_stats=True)
    qps = stats.n_queries / max(stats.seconds, 1e-12)
    print(f"recall@{args.k} = {_recall(found, true):.4f}  QPS = {qps:.0f}  "
          f"dot products/query = {stats.dot_products:.0f} (speedup {index.ntotal / stats.dot_products:.1f}x)  "
          f"leaves probed = {stats.leaves_probed:.1f}")
    return 0


def add_mips_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``triptych mips build|search|eval`` on the top-level subcommands."""
    mips = commands.add_parser("mips", help="build, query and evaluate a clustering MIPS index",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = mips.add_subparsers(dest="mips_command", required=True)

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")

    build = sub.add_parser("build", help="train an index on vectors.npy and add them")
    build.add_argument("vectors", help="item vectors, .npy (N, d)")
    build.add_argument("-o", "--output", required=True, help="index file to write (.tpx)")
    build.add_argument("--levels", type=int, default=1, help="levels of the hierarchy (default 1)")
    build.add_argument("--clusters", type=int, default=None, help="leaf clusters (default about 4 sqrt(N))")
    build.add_argument("--reduction", default="sign_alsh", choices=["sign_alsh", "simple_lsh"])
    build.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    common(build)
    build.set_defaults(handler=_build)

    search = sub.add_parser("search", help="top-k inner products of queries.npy, written to an .npz")
    search.add_argument("index", help="index file (.tpx)")
    search.add_argument("queries", help="query vectors, .npy (n, d)")
    search.add_argument("-k", type=int, default=10, help="answers per query (default 10)")
    search.add_argument("-o", "--output", required=True, help=".npz to write (scores, ids)")
    search.add_argument("--branches", type=int, default=None, help="branches per level (default: the index's)")
    common(search)
    search.set_defaults(handler=_search)

    evaluate = sub.add_parser("eval", help="recall@k and QPS of the index on queries.npy")
    evaluate.add_argument("index", help="index file (.tpx)")
    evaluate.add_argument("queries", help="query vectors, .npy (n, d)")
    evaluate.add_argument("--ground-truth", default=None,
                          help="true top ids, .npy (n, >= k); default: the index's exact answer")
    evaluate.add_argument("-k", type=int, default=10, help="answers per query (default 10)")
    evaluate.add_argument("--branches", type=int, default=None, help="branches per level (default: the index's)")
    common(evaluate)
    evaluate.set_defaults(handler=_eval)

