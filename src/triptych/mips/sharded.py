"""``ShardedClusterIndex``: maximum inner product search over shards, each a :class:`ClusterIndex` in a Ray actor.

For item sets that outgrow one machine: the items are split into ``S`` shards, every shard is an independent
:class:`~triptych.mips.index.ClusterIndex` (the same parameters for all) held by one Ray actor, and a search asks
every shard for its top ``k`` and merges them. The driver (the process holding the ``ShardedClusterIndex``) holds
no vectors. Needs Ray: ``pip install 'triptych[distributed]'``.

Sharding rule (deterministic): every ``train(x)`` and ``add(x)`` call splits its ``x`` ``(N, d)`` into ``S``
contiguous parts of sizes ``⌈N/S⌉`` then ``⌊N/S⌋`` (``numpy.array_split``); part ``i`` goes to shard ``i``. Global
ids are positions across all ``add`` calls, as in :class:`ClusterIndex`; each shard keeps a map local id → global
id, ``(N_i,)`` int64, and answers in global ids.

Results are exactly those of ``S`` independent ``ClusterIndex`` objects, each trained on its own shard's part of
the training set, whose per-shard top ``k`` are merged (scores descending, ties broken by shard, then by the
shard's rank). ``branches`` is per shard: every shard probes its ``branches`` best leaves; ``branches`` at least the
largest shard's leaf count gives the exact answer.

Faults. Shard actors run with Ray's ``max_restarts``; a restarted actor comes back empty. Every shard carries a
version (the number of ``train``/``add`` calls applied to it), every call tells the shard the version the driver
expects, and every reply carries the shard's version. When a shard dies during a call (``RayActorError``), or
answers at another version (it died and restarted between calls), the driver waits for the restart, reloads the
shard from the last :meth:`~ShardedClusterIndex.save` (the files are checked against the SHA-256 in the manifest)
and sends the call again, at most ``retries`` times. A shard can only be restored to the version the driver
expects: if it was changed after the last save, or the index was never saved, the call raises ``RuntimeError``
instead of answering from a stale or empty shard. A search therefore returns complete results or raises.

Files (``save(directory)``): each shard actor writes ``shard-IIII-TOKEN.tpx`` (:meth:`ClusterIndex.save`) and
``shard-IIII-TOKEN.ids.npy`` (its id map) atomically; then the driver writes ``manifest.json`` last, atomically:
format version, ``dim``, ``n_shards``, index parameters, ``ntotal``, the version, and per shard the file names,
sizes, SHA-256 and item count, with a SHA-256 of the manifest itself. ``TOKEN`` is new at every save, so a save
never overwrites the files the current manifest lists: a save cut short leaves the previous one loadable. Shard
files no longer listed are removed after the manifest is written. One writer per directory.

Running on a cluster::

    # on the head node
    ray start --head --port=6379
    # on every other node
    ray start --address=HEAD_IP:6379

    # in the driver program (on any node)
    import ray
    ray.init(address="auto")            # or ray.init(address="HEAD_IP:6379")
    index = ShardedClusterIndex(50, n_shards=16, num_cpus=4)   # one shard per 4 CPUs
    index.train(sample)                                          # e.g. a few million items
    for chunk in chunks:                                         # every chunk is split over all the shards
        index.add(chunk)
    index.save("/shared/index")                                  # a folder every node can read and write

The vectors of ``train``/``add`` pass through the driver (``ray.put``), so add item sets larger than its memory in
chunks; each chunk is spread over every shard. Ray places the shard actors on the nodes with free CPUs
(``num_cpus`` each). ``save``/``load`` and restarts read and write the shard files from the node running each
actor, so ``directory`` must be on a file system every node mounts at the same path (NFS, a cloud file system).
Without ``ray.init`` Ray starts a local one-machine cluster.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from triptych import _io
from triptych._validation import as_float_matrix, check_int, check_real
from triptych.mips.index import ClusterIndex

__all__ = ["ShardedClusterIndex", "merge_top_k", "read_manifest"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'triptych[distributed]'"
MANIFEST = "manifest.json"
FORMAT = "triptych-sharded-mips"
FORMAT_VERSION = 1
_SHARD_FILE = re.compile(r"shard-\d{4,}-[0-9a-f]{8}\.(tpx|ids\.npy)")


def _import_ray() -> Any:
    """The ``ray`` module, or an ``ImportError`` saying how to install it."""
    try:
        import ray
    except ImportError as err:
        raise ImportError(f"ShardedClusterIndex needs Ray, which is not installed: {INSTALL_HINT}") from err
    return ray


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers


def merge_top_k(scores: list[np.ndarray], ids: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-k lists into the global top ``k``.

    Args:
        scores: one ``(n, k_s)`` float array per shard, best first, ``-inf`` padded.
        ids: the matching ``(n, k_s)`` int64 global ids, ``-1`` padded.
        k: answers kept, at most ``Σ k_s``.

    Returns:
        ``scores`` ``(n, k)`` and ``ids`` ``(n, k)``, scores descending; equal scores keep shard order, then rank
        order (a stable sort), so padding (``-inf``, ``-1``) stays last.
    """
    all_scores, all_ids = np.concatenate(scores, axis=1), np.concatenate(ids, axis=1)
    order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(all_scores, order, axis=1), np.take_along_axis(all_ids, order, axis=1)


def _to_global(local_ids: np.ndarray, id_map: np.ndarray) -> np.ndarray:
    """Local ids ``(n, k)`` (``-1`` padded) → global ids ``(n, k)`` through ``id_map`` ``(N_i,)``."""
    out = np.full_like(local_ids, -1)
    found = local_ids >= 0
    out[found] = id_map[local_ids[found]]
    return out


def _writable(array: np.ndarray) -> np.ndarray:
    """``array``, copied when read-only (Ray hands arguments over as read-only views of its object store)."""
    return array if array.flags.writeable else array.copy()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _check_size(path: Path, size: int) -> None:
    """Raise ``ValueError`` naming ``path`` unless it exists with ``size`` bytes."""
    if not path.is_file():
        raise ValueError(f"{path}: shard file listed in the manifest is missing")
    actual = path.stat().st_size
    if actual != size:
        raise ValueError(f"{path}: truncated or padded shard file: {actual} bytes, the manifest says {size}")


def _check_file(path: Path, size: int, sha256: str) -> None:
    """Raise ``ValueError`` naming ``path`` unless it exists with ``size`` bytes and the SHA-256 ``sha256``."""
    _check_size(path, size)
    if _io.sha256_file(path) != sha256:
        raise ValueError(f"{path}: corrupted shard file: its SHA-256 does not match the manifest")


def _storage_bytes(value: Any, seen: dict[int, int]) -> None:
    """Record in ``seen`` (storage address → bytes) every tensor storage reachable from ``value``."""
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    elif isinstance(value, list | tuple):
        for item in value:
            _storage_bytes(item, seen)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for item in dataclasses.fields(value):
            _storage_bytes(getattr(value, item.name), seen)


def _tensor_bytes(index: ClusterIndex) -> int:
    """Bytes of all the tensors an index holds (items, ids, centroids, node statistics), shared storage once."""
    seen: dict[int, int] = {}
    _storage_bytes(list(vars(index).values()), seen)
    return sum(seen.values())


def _process_memory() -> dict[str, int | None]:
    """Resident memory of this process now (``rss_bytes``) and at its peak (``peak_rss_bytes``), from Linux
    ``/proc``; ``None`` where unavailable."""
    fields = {"VmRSS:": "rss_bytes", "VmHWM:": "peak_rss_bytes"}
    memory: dict[str, int | None] = dict.fromkeys(fields.values())
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            parts = line.split()
            if parts and parts[0] in fields:
                memory[fields[parts[0]]] = int(parts[1]) * 1024
    except OSError:
        pass
    return memory


def _manifest_digest(body: dict[str, Any]) -> str:
    return _io.sha256_bytes(json.dumps(body, sort_keys=True).encode("utf-8"))


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``directory/manifest.json`` of a saved :class:`ShardedClusterIndex`.

    Raises:
        ValueError: the manifest is missing, not JSON, altered (its SHA-256 does not match), of another format or
            format version, or lists another number of shards than ``n_shards``; the message names the file.
    """
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing; not a saved ShardedClusterIndex") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: corrupted manifest (not JSON: {err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a ShardedClusterIndex manifest (format {FORMAT!r} expected)")
    digest = manifest.pop("manifest_sha256", None)
    if digest != _manifest_digest(manifest):
        raise ValueError(f"{path}: corrupted manifest: its SHA-256 does not match its content")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format version {manifest['format_version']}, "
                         f"expected {FORMAT_VERSION}")
    if len(manifest["shards"]) != manifest["n_shards"]:
        raise ValueError(f"{path}: lists {len(manifest['shards'])} shards, n_shards is {manifest['n_shards']}")
    return manifest


# ----------------------------------------------------------------------------------------------------------------
# The shard, run inside a Ray actor


class _Shard:
    """One shard: a :class:`ClusterIndex` and its id map, in a Ray actor (:func:`_shard_actor_class`).

    Every method takes ``expected``, the version the driver believes the shard is at, and returns
    ``(version, payload)``. A shard at another version does nothing and answers its own version; a mutation
    already applied (its reply was lost) answers ``expected + 1`` again, so a repeated call is harmless. A restarted
    actor runs ``__init__`` again: empty, at version 0.
    """

    def __init__(self, params: dict[str, Any], threads: int) -> None:
        torch.set_num_threads(threads)
        self._params = params
        self._index: ClusterIndex | None = None
        self._id_map = np.zeros(0, dtype=np.int64)
        self._version = 0

    def version(self) -> int:
        return self._version

    def train(self, expected: int, x: np.ndarray) -> tuple[int, None]:
        if self._version == expected:
            self._index = ClusterIndex(**self._params).train(_writable(x))
            self._id_map = np.zeros(0, dtype=np.int64)
            self._version += 1
        return self._version, None

    def add(self, expected: int, x: np.ndarray, global_ids: np.ndarray) -> tuple[int, None]:
        if self._version == expected:
            self._index.add(_writable(x))
            self._id_map = np.concatenate([self._id_map, global_ids])
            self._version += 1
        return self._version, None

    def search(self, expected: int, queries: np.ndarray, k: int,
               branches: int | None) -> tuple[int, tuple[np.ndarray, np.ndarray] | None]:
        if self._version != expected:
            return self._version, None
        scores, local_ids = self._index.search(_writable(queries), k, branches)
        return self._version, (scores, _to_global(local_ids, self._id_map))

    def save(self, expected: int, directory: str, stem: str) -> tuple[int, dict[str, Any] | None]:
        if self._version != expected:
            return self._version, None
        index_path = self._index.save(Path(directory) / f"{stem}.tpx")
        ids = _npy_bytes(self._id_map)
        ids_path = _io.atomic_write_bytes(Path(directory) / f"{stem}.ids.npy", ids)
        return self._version, {
            "index_file": index_path.name, "index_bytes": index_path.stat().st_size,
            "index_sha256": _io.sha256_file(index_path), "ids_file": ids_path.name, "ids_bytes": len(ids),
            "ids_sha256": _io.sha256_bytes(ids), "ntotal": self._index.ntotal, "version": self._version}

    def load(self, directory: str, entry: dict[str, Any]) -> int:
        """Replace the shard by the files of ``entry`` (a manifest's shard entry), checked first; its version."""
        index_path, ids_path = Path(directory) / entry["index_file"], Path(directory) / entry["ids_file"]
        _check_file(index_path, entry["index_bytes"], entry["index_sha256"])
        _check_file(ids_path, entry["ids_bytes"], entry["ids_sha256"])
        index = ClusterIndex.load(index_path)
        id_map = np.load(io.BytesIO(ids_path.read_bytes()), allow_pickle=False)
        if id_map.dtype != np.int64 or id_map.shape != (index.ntotal,):
            raise ValueError(f"{ids_path}: expected {index.ntotal} int64 ids, got {id_map.dtype} {id_map.shape}")
        self._index, self._id_map, self._version = index, id_map, int(entry["version"])
        return self._version

    def stats(self, expected: int) -> tuple[int, dict[str, Any] | None]:
        if self._version != expected:
            return self._version, None
        return self._version, {"ntotal": self._index.ntotal, "n_leaves": self._index.n_leaves,
                               "tensor_bytes": _tensor_bytes(self._index), "ids_bytes": self._id_map.nbytes,
                               **_process_memory(), "pid": os.getpid()}


@cache
def _shard_actor_class() -> Any:
    return _import_ray().remote(_Shard)


@dataclass(frozen=True)
class _Snapshot:
    """The last save: its folder and the manifest's shard entries (what a restarted shard reloads)."""

    directory: Path
    entries: list[dict[str, Any]]


# ----------------------------------------------------------------------------------------------------------------
# The driver


class ShardedClusterIndex:
    """MIPS over ``n_shards`` :class:`ClusterIndex` shards held by Ray actors (faiss-like ``train``/``add``/``search``).

    See the module docstring for the sharding rule, the fault handling and how to run on a cluster.

    Args:
        dim: vector dimension ``d``.
        n_shards: shards ``S``, one Ray actor each.
        directory: default folder of :meth:`save` (later saves and :meth:`load` replace it).
        num_cpus: Ray CPUs reserved per shard actor; each uses ``max(1, ⌊num_cpus⌋)`` torch threads.
        max_restarts: Ray restarts allowed per shard actor.
        retries: times a call is sent again to a shard that died or restarted, per call.
        restart_timeout_s: how long to wait for a dead shard's actor to come back.
        **index_kwargs: :class:`ClusterIndex` parameters (``levels``, ``n_clusters``, ``reduction``, ``m``, ``U``,
            ``n_bands``, ``slack``, ``seed``, ``max_iter``), the same for every shard; ``n_clusters`` is per shard.

    Raises:
        ImportError: Ray is not installed.
        ValueError / TypeError: invalid arguments (``ClusterIndex`` parameter values are checked by :meth:`train`).
    """

    def __init__(self, dim: int, n_shards: int, *, directory: str | os.PathLike | None = None, num_cpus: float = 1.0,
                 max_restarts: int = 3, retries: int = 3, restart_timeout_s: float = 120.0,
                 **index_kwargs: Any) -> None:
        _import_ray()
        self.dim = check_int("dim", dim, low=1)
        self.n_shards = check_int("n_shards", n_shards, low=1)
        self.num_cpus = check_real("num_cpus", num_cpus, low=0.0)
        if self.num_cpus > 1 and not self.num_cpus.is_integer():
            raise ValueError(f"num_cpus above 1 must be a whole number (a Ray rule), got {self.num_cpus}")
        self.max_restarts = check_int("max_restarts", max_restarts, low=0)
        self.retries = check_int("retries", retries, low=0)
        self.restart_timeout_s = check_real("restart_timeout_s", restart_timeout_s, low=0.0, low_inclusive=False)
        if "progress" in index_kwargs:
            raise TypeError("ShardedClusterIndex does not take progress: each shard trains in its own actor process")
        ClusterIndex(dim, **index_kwargs)  # unknown parameter names raise TypeError here, not in the actors
        self.index_kwargs = dict(index_kwargs)
        self.directory = Path(directory) if directory is not None else None
        self.is_trained = False
        self._actors: list[Any] = []
        self._version = 0
        self._shard_sizes = [0] * self.n_shards
        self._snapshot: _Snapshot | None = None
        self._broken: str | None = None

    # ------------------------------------------------------------------ properties
    @property
    def ntotal(self) -> int:
        """Number of items added, over all shards."""
        return sum(self._shard_sizes)

    @property
    def shard_sizes(self) -> list[int]:
        """Items held by each shard."""
        return list(self._shard_sizes)

    @property
    def version(self) -> int:
        """Number of ``train``/``add`` calls applied to every shard (saved in the manifest)."""
        return self._version

    @property
    def actors(self) -> tuple[Any, ...]:
        """The shard actors' Ray handles, shard order (for monitoring; empty before training)."""
        return tuple(self._actors)

    def _require_usable(self, action: str) -> None:
        if self._broken is not None:
            raise RuntimeError(f"cannot {action}: {self._broken}; load the last save or train again")
        if not self.is_trained:
            raise ValueError(f"the index must be trained before {action}; call train(x) first")

    # ------------------------------------------------------------------ build
    def train(self, x: Any) -> ShardedClusterIndex:
        """Train shard ``i`` on part ``i`` of ``x`` ``(N, d)``, all shards in parallel; returns ``self``.

        As :meth:`ClusterIndex.train`: does not add ``x``, and retraining discards every added item. After a
        ``train``/``add`` that failed part-way, the actors are replaced by new ones first.
        """
        ClusterIndex(self.dim, **self.index_kwargs)._check_params()
        x = as_float_matrix("x", x, dim=self.dim).cpu().numpy()
        if x.shape[0] < self.n_shards:
            raise ValueError(f"train needs at least one vector per shard ({self.n_shards}), got {x.shape[0]}")
        parts = np.array_split(x, self.n_shards)
        n_clusters = self.index_kwargs.get("n_clusters")
        if n_clusters is not None and n_clusters > parts[-1].shape[0]:
            raise ValueError(f"n_clusters (per shard) must be <= the training vectors of every shard "
                             f"({parts[-1].shape[0]}), got {n_clusters}")
        ray = _import_ray()
        if self._broken is not None:
            self.close()  # the shards may disagree on their version: start again from fresh actors
        if not self._actors:
            self._actors = [self._start_actor() for _ in range(self.n_shards)]
        refs = [ray.put(part) for part in parts]
        self.is_trained = False
        self._mutate("train", lambda i: (refs[i],))
        self._shard_sizes = [0] * self.n_shards
        self.is_trained = True
        return self

    def add(self, x: Any) -> ShardedClusterIndex:
        """Add ``x`` ``(N, d)``, part ``i`` (module docstring) to shard ``i``; ids continue from :attr:`ntotal`."""
        self._require_usable("add")
        x = as_float_matrix("x", x, dim=self.dim).cpu().numpy()
        if x.shape[0] == 0:
            return self
        ray = _import_ray()
        parts = np.array_split(x, self.n_shards)
        ids = np.array_split(np.arange(self.ntotal, self.ntotal + x.shape[0], dtype=np.int64), self.n_shards)
        refs = [(ray.put(part), ray.put(part_ids)) for part, part_ids in zip(parts, ids, strict=True)]
        self._mutate("add", lambda i: refs[i])
        self._shard_sizes = [size + part.shape[0] for size, part in zip(self._shard_sizes, parts, strict=True)]
        return self

    def _start_actor(self) -> Any:
        params = {"dim": self.dim, **self.index_kwargs}
        options = {"num_cpus": self.num_cpus, "max_restarts": self.max_restarts, "max_task_retries": 0}
        return _shard_actor_class().options(**options).remote(params, max(1, int(self.num_cpus)))

    def _mutate(self, method: str, args_of: Callable[[int], tuple]) -> None:
        """:meth:`_call` a version-advancing method; a failure part-way leaves the index unusable until retrained."""
        try:
            self._call(method, args_of, advance=1)
        except BaseException as err:
            self._broken = f"{method} failed part-way, the shards no longer agree ({err})"
            raise
        self._version += 1

    # ------------------------------------------------------------------ search
    def search(self, queries: Any, k: int, branches: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` items of largest ``q·x`` for every query, over all shards, best first.

        The query batch is put in Ray's object store once and read by every shard.

        Args:
            queries: ``(n, d)`` numpy array or tensor.
            k: answers per query; rows are padded with ``-inf`` scores and ``-1`` ids past the items found.
            branches: leaves probed per shard (nodes per level when ``levels > 1``); default each shard's
                :meth:`ClusterIndex.default_branches`.

        Returns:
            ``scores`` ``(n, k)`` float32 and global ``ids`` ``(n, k)`` int64 numpy arrays.

        Raises:
            RuntimeError: a shard died and could not be restored to its current state (see the module docstring).
        """
        self._require_usable("search")
        k = check_int("k", k, low=1)
        if branches is not None:
            branches = check_int("branches", branches, low=1)
        q = as_float_matrix("queries", queries, dim=self.dim).cpu().numpy()
        if q.shape[0] == 0:
            return np.zeros((0, k), dtype=np.float32), np.zeros((0, k), dtype=np.int64)
        q_ref = _import_ray().put(q)
        replies = self._call("search", lambda i: (q_ref, k, branches), advance=0)
        return merge_top_k([scores for scores, _ in replies], [ids for _, ids in replies], k)

    def shard_stats(self) -> list[dict[str, Any]]:
        """Per shard: ``ntotal``, ``n_leaves``, ``tensor_bytes`` (the index's tensors), ``ids_bytes`` (id map),
        ``rss_bytes`` and ``peak_rss_bytes`` (the actor process's resident memory now and at its peak, ``None``
        off Linux) and the actor's ``pid``."""
        self._require_usable("shard_stats")
        return self._call("stats", lambda i: (), advance=0)

    # ------------------------------------------------------------------ calls, faults
    def _call(self, method: str, args_of: Callable[[int], tuple], *, advance: int) -> list[Any]:
        """Call ``method(version, *args_of(i))`` on every shard; the payloads in shard order.

        A shard that dies during the call, or answers at a version other than ``version + advance``, is restored
        (:meth:`_recover`) and called again, at most :attr:`retries` times.
        """
        ray = _import_ray()
        before, after = self._version, self._version + advance
        payloads: list[Any] = [None] * self.n_shards
        pending = {i: getattr(self._actors[i], method).remote(before, *args_of(i)) for i in range(self.n_shards)}
        attempt = 0
        while True:
            failed: dict[int, str] = {}
            for i, ref in pending.items():
                try:
                    version, payload = ray.get(ref)
                except ray.exceptions.RayActorError as err:
                    failed[i] = f"actor died ({type(err).__name__})"
                    continue
                except ray.exceptions.RayTaskError as err:
                    raise _user_error(err, i) from err
                if version != after:
                    failed[i] = f"answered at version {version}, expected {after} (its actor restarted)"
                    continue
                payloads[i] = payload
            if not failed:
                return payloads
            if attempt == self.retries:
                raise RuntimeError(f"{method} failed on shards {sorted(failed)} after {self.retries} retries: "
                                   + "; ".join(f"shard {i}: {why}" for i, why in failed.items()))
            attempt += 1
            for i, why in failed.items():
                logger.warning("%s: shard %d %s; restoring it and retrying", method, i, why)
                self._recover(i, before, after)
            pending = {i: getattr(self._actors[i], method).remote(before, *args_of(i)) for i in failed}

    def _recover(self, shard: int, before: int, after: int) -> None:
        """Bring shard ``shard`` back to version ``before`` (or ``after``: the call was applied) or raise."""
        ray = _import_ray()
        version = self._wait_alive(shard)
        if version in (before, after):
            return
        if self._snapshot is None:
            raise RuntimeError(f"shard {shard} died and came back empty, and the index was never saved, so there is "
                               f"no file to restart it from; save() the index to make shards restartable, or rebuild")
        entry = self._snapshot.entries[shard]
        if entry["version"] != before:
            raise RuntimeError(f"shard {shard} lost changes made after the last save (saved at version "
                               f"{entry['version']}, index at version {before}); load the last save with "
                               f"ShardedClusterIndex.load({str(self._snapshot.directory)!r}) and repeat the "
                               f"train/add calls made since, or save after every change")
        try:
            ray.get(self._actors[shard].load.remote(str(self._snapshot.directory), entry))
        except ray.exceptions.RayActorError as err:  # died again: the retry finds it at the wrong version
            logger.warning("shard %d died while reloading (%s)", shard, type(err).__name__)
        except ray.exceptions.RayTaskError as err:
            raise RuntimeError(f"shard {shard} could not be restored from the last save: {err.cause}") from err
        else:
            logger.warning("shard %d restored from %s", shard, self._snapshot.directory / entry["index_file"])

    def _wait_alive(self, shard: int) -> int:
        """Wait until shard ``shard``'s actor answers (it may be restarting); its version."""
        ray = _import_ray()
        deadline = time.monotonic() + self.restart_timeout_s
        delay = 0.05
        while True:
            try:
                return ray.get(self._actors[shard].version.remote(), timeout=max(0.01, deadline - time.monotonic()))
            except ray.exceptions.ActorDiedError as err:
                raise RuntimeError(f"shard {shard}'s actor is dead for good (max_restarts = {self.max_restarts} "
                                   f"used up, or its node is gone); load the last save") from err
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"shard {shard} did not come back within restart_timeout_s = "
                                       f"{self.restart_timeout_s} s") from err
                time.sleep(delay)
                delay = min(1.0, 2 * delay)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike | None = None) -> Path:
        """Write every shard (by its actor) and then ``manifest.json`` into ``directory``; returns the folder.

        ``directory`` defaults to :attr:`directory`; it becomes :attr:`directory` and the source a restarted
        shard reloads from. See the module docstring for the layout.
        """
        self._require_usable("save")
        if directory is None and self.directory is None:
            raise ValueError("save needs a directory: pass save(directory) or ShardedClusterIndex(..., directory=)")
        folder = Path(directory if directory is not None else self.directory).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex[:8]
        entries = self._call("save", lambda i: (str(folder), f"shard-{i:04d}-{token}"), advance=0)
        body = {"format": FORMAT, "format_version": FORMAT_VERSION, "dim": self.dim, "n_shards": self.n_shards,
                "index_params": self.index_kwargs, "ntotal": self.ntotal, "version": self._version,
                "shards": entries}
        manifest = {**body, "manifest_sha256": _manifest_digest(body)}
        _io.atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        listed = {entry[key] for entry in entries for key in ("index_file", "ids_file")}
        for path in folder.iterdir():
            if _SHARD_FILE.fullmatch(path.name) and path.name not in listed:
                path.unlink(missing_ok=True)
        self._snapshot = _Snapshot(folder, entries)
        self.directory = folder
        return folder

    @classmethod
    def load(cls, directory: str | os.PathLike, *, num_cpus: float = 1.0, max_restarts: int = 3, retries: int = 3,
             restart_timeout_s: float = 120.0) -> ShardedClusterIndex:
        """Start one actor per shard of the index saved in ``directory``, each loading its files.

        The manifest is checked first (:func:`read_manifest`) and every shard file's size, then each actor checks
        its files' SHA-256 (in parallel) before loading them.

        Raises:
            ValueError: a missing, truncated or corrupted manifest or shard file (the message names the file).
        """
        folder = Path(directory).resolve()
        manifest = read_manifest(folder)
        for entry in manifest["shards"]:
            _check_size(folder / entry["index_file"], entry["index_bytes"])
            _check_size(folder / entry["ids_file"], entry["ids_bytes"])
        index = cls(manifest["dim"], manifest["n_shards"], directory=folder, num_cpus=num_cpus,
                    max_restarts=max_restarts, retries=retries, restart_timeout_s=restart_timeout_s,
                    **manifest["index_params"])
        entries = manifest["shards"]
        ray = _import_ray()
        index._actors = [index._start_actor() for _ in entries]
        refs = [actor.load.remote(str(folder), entry) for actor, entry in zip(index._actors, entries, strict=True)]
        try:
            for shard, ref in enumerate(refs):
                try:
                    ray.get(ref)
                except ray.exceptions.RayTaskError as err:
                    raise _user_error(err, shard) from err
        except BaseException:
            index.close()
            raise
        index._version = int(manifest["version"])
        index._shard_sizes = [int(entry["ntotal"]) for entry in entries]
        index._snapshot = _Snapshot(folder, entries)
        index.is_trained = True
        return index

    def close(self) -> None:
        """Stop the shard actors (without restart) and forget the last save: the index is as constructed."""
        ray = _import_ray()
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors, self.is_trained, self._broken = [], False, None
        # versions restart at 0 with new actors: a save of the old ones must never match them
        self._version, self._shard_sizes, self._snapshot = 0, [0] * self.n_shards, None

    def __repr__(self) -> str:
        state = f"ntotal={self.ntotal}, version={self._version}" if self.is_trained else "untrained"
        return f"ShardedClusterIndex(dim={self.dim}, n_shards={self.n_shards}, {state})"


def _user_error(err: Any, shard: int) -> BaseException:
    """The ``ValueError``/``TypeError`` a shard raised (bad input or a bad file), else Ray's ``RayTaskError``."""
    cause = err.cause
    if isinstance(cause, ValueError):
        return ValueError(f"shard {shard}: {cause}")
    if isinstance(cause, TypeError):
        return TypeError(f"shard {shard}: {cause}")
    return err
