"""ShardedClusterIndex: equal to merged local ClusterIndex shards, exact at full probe, files, faults, bad input."""

import json
import logging
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from triptych.data.vectors import gaussian_mips  # noqa: E402
from triptych.mips import ClusterIndex, ShardedClusterIndex  # noqa: E402

DIM, N_ITEMS, N_QUERIES, K = 24, 3000, 200, 10
N_SHARDS = 2
PARAMS = {"seed": 3, "n_bands": 2}
ADD_CALLS = (1001, 1999)  # two add calls, both split unevenly over the shards
ALL_LEAVES = 10_000  # branches above every shard's leaf count: every leaf probed
ACTOR = {"num_cpus": 0.25}  # Ray has 2 CPUs here: several indexes' actors must fit at once


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data():
    return gaussian_mips(N_ITEMS, N_QUERIES, DIM, seed=0, k=K)


def _parts(n: int, start: int = 0) -> list[np.ndarray]:
    """The documented rule: contiguous parts, the first ``n % S`` one longer."""
    return np.array_split(np.arange(start, start + n), N_SHARDS)


@pytest.fixture(scope="module")
def local_shards(data):
    """Per shard, built here in one thread: a ClusterIndex on the shard's items and its global ids."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    items = data.items.numpy()
    shards = [ClusterIndex(DIM, **PARAMS).train(items[rows]) for rows in _parts(N_ITEMS)]
    id_maps = [np.zeros(0, dtype=np.int64)] * N_SHARDS
    start = 0
    for n in ADD_CALLS:
        for i, rows in enumerate(_parts(n, start)):
            shards[i].add(items[rows])
            id_maps[i] = np.concatenate([id_maps[i], rows])
        start += n
    torch.set_num_threads(threads)
    return shards, id_maps


@pytest.fixture(scope="module")
def sharded(ray_cluster, data):
    index = ShardedClusterIndex(DIM, N_SHARDS, **ACTOR, **PARAMS).train(data.items)
    start = 0
    for n in ADD_CALLS:
        index.add(data.items[start:start + n])
        start += n
    yield index
    index.close()


@pytest.fixture(scope="module")
def saved(sharded, tmp_path_factory):
    return sharded.save(tmp_path_factory.mktemp("sharded"))


def _reference(shards, id_maps, queries, branches=None):
    """Merge of the local shards' top k, written independently of merge_top_k: sort by (−score, shard, rank)."""
    scores, ids = [], []
    for index, id_map in zip(shards, id_maps, strict=True):
        s, local = index.search(queries, K, branches)
        scores.append(s)
        ids.append(np.where(local >= 0, id_map[np.maximum(local, 0)], -1))
    scores, ids = np.concatenate(scores, axis=1), np.concatenate(ids, axis=1)
    position = np.arange(scores.shape[1])
    order = np.stack([np.lexsort((position, -row))[:K] for row in scores])
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def _assert_same(result, expected):
    np.testing.assert_array_equal(result[1], expected[1])
    np.testing.assert_array_equal(result[0], expected[0])
    assert result[0].dtype == np.float32 and result[1].dtype == np.int64


def _kill(actor, timeout_s: float = 60.0) -> None:
    """Kill a shard actor and let Ray restart it; return once the restarted (empty, version 0) actor answers.

    ``ray.kill`` returns before the old process is gone, so without the wait the next call may still reach it.
    """
    ray.kill(actor, no_restart=False)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if ray.get(actor.version.remote(), timeout=timeout_s) == 0:
                return
        except ray.exceptions.RayError:  # dead or restarting
            pass
        time.sleep(0.05)
    raise AssertionError(f"the killed actor did not come back within {timeout_s} s")


def _recoveries(caplog) -> int:
    return sum("restoring it" in record.getMessage() for record in caplog.records)


# ------------------------------------------------------------------------------------------------ results


@pytest.mark.parametrize("branches", [None, 1, 4])
def test_equals_merged_local_shards_bit_for_bit(sharded, local_shards, data, branches):
    assert sharded.ntotal == N_ITEMS and sharded.shard_sizes == [1501, 1499]
    _assert_same(sharded.search(data.queries, K, branches), _reference(*local_shards, data.queries, branches))


def test_full_probe_is_exact(sharded, data):
    scores, ids = sharded.search(data.queries, K, branches=ALL_LEAVES)
    np.testing.assert_array_equal(ids, data.true_ids.numpy())
    np.testing.assert_allclose(scores, data.true_scores.numpy(), rtol=1e-5, atol=1e-5)
    single = ClusterIndex(DIM, **PARAMS).train(data.items).add(data.items)
    np.testing.assert_array_equal(ids, single.search(data.queries, K, branches=ALL_LEAVES)[1])


def test_padding_when_fewer_items_than_k(ray_cluster, data):
    index = ShardedClusterIndex(DIM, N_SHARDS, **ACTOR, n_clusters=2).train(data.items[:40])
    try:
        index.add(data.items[:5])
        scores, ids = index.search(data.queries[:3], K, branches=ALL_LEAVES)
        np.testing.assert_array_equal(np.sort(ids[:, :5], axis=1), np.tile(np.arange(5), (3, 1)))
        assert (ids[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()
        assert (np.diff(scores[:, :5], axis=1) <= 0).all()
    finally:
        index.close()


# ------------------------------------------------------------------------------------------------ files


def test_save_load_round_trip(sharded, saved, data):
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["n_shards"] == N_SHARDS and manifest["ntotal"] == N_ITEMS and manifest["version"] == 3
    assert [entry["ntotal"] for entry in manifest["shards"]] == [1501, 1499]
    loaded = ShardedClusterIndex.load(saved, **ACTOR)
    try:
        assert loaded.ntotal == N_ITEMS and loaded.version == sharded.version
        for branches in (None, ALL_LEAVES):
            _assert_same(loaded.search(data.queries, K, branches), sharded.search(data.queries, K, branches))
    finally:
        loaded.close()


def _shard_file(folder, key="index_file"):
    return folder / json.loads((folder / "manifest.json").read_text())["shards"][1][key]


def _flip_byte(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


def _edit_manifest(path):
    manifest = json.loads(path.read_text())
    manifest["ntotal"] += 1
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, target, message", [
    (_flip_byte, lambda f: _shard_file(f), r"shard-0001-\w+\.tpx: corrupted shard file"),
    (_truncate, lambda f: _shard_file(f, "ids_file"), r"shard-0001-\w+\.ids\.npy: truncated"),
    (lambda p: p.unlink(), lambda f: _shard_file(f), r"shard-0001-\w+\.tpx: shard file .* is missing"),
    (_truncate, lambda f: f / "manifest.json", r"manifest\.json: corrupted manifest \(not JSON"),
    (_edit_manifest, lambda f: f / "manifest.json", r"manifest\.json: corrupted manifest: its SHA-256"),
    (lambda p: p.unlink(), lambda f: f / "manifest.json", r"manifest\.json: missing"),
])
def test_damaged_files_raise(saved, tmp_path, damage, target, message):
    folder = shutil.copytree(saved, tmp_path / "copy")
    damage(target(folder))
    with pytest.raises(ValueError, match=message):
        ShardedClusterIndex.load(folder, **ACTOR)


def test_save_keeps_only_the_listed_shard_files(sharded, tmp_path):
    sharded.save(tmp_path)
    sharded.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    listed = {entry[key] for entry in manifest["shards"] for key in ("index_file", "ids_file")}
    assert {p.name for p in tmp_path.iterdir()} == listed | {"manifest.json"}


# ------------------------------------------------------------------------------------------------ faults


def test_killed_actor_loses_no_query(sharded, saved, data, caplog):
    batches = np.array_split(data.queries.numpy(), 10)
    expected = [sharded.search(batch, K) for batch in batches]
    index = ShardedClusterIndex.load(saved, **ACTOR)
    try:
        pid = index.shard_stats()[1]["pid"]
        caplog.set_level(logging.WARNING, logger="triptych.mips.sharded")
        for step, batch in enumerate(batches):
            if step == 3:
                _kill(index.actors[1])
            _assert_same(index.search(batch, K), expected[step])
        assert _recoveries(caplog) == 1
        assert index.shard_stats()[1]["pid"] != pid
    finally:
        index.close()


def test_restart_restores_the_saved_state_never_a_stale_one(saved, local_shards, data):
    index = ShardedClusterIndex.load(saved, **ACTOR)
    try:
        _kill(index.actors[1])
        extra = data.items[:301] * 1.5
        index.add(extra)  # shard 1 is restored from the save (the index's current state), then adds its part
        assert index.ntotal == N_ITEMS + 301
        shards = [ClusterIndex.load(path) for path in sorted(saved.glob("shard-*.tpx"))]
        id_maps = list(local_shards[1])
        for i, rows in enumerate(_parts(301, N_ITEMS)):
            shards[i].add(extra[rows - N_ITEMS])
            id_maps[i] = np.concatenate([id_maps[i], rows])
        _assert_same(index.search(data.queries, K), _reference(shards, id_maps, data.queries))
        _kill(index.actors[0])  # the save now lacks the add
        with pytest.raises(RuntimeError, match="shard 0 lost changes made after the last save"):
            index.search(data.queries, K)
        with pytest.raises(RuntimeError, match="shard 0 lost changes"):  # and it stays refused
            index.search(data.queries, K)
    finally:
        index.close()


def test_death_before_any_save_raises_until_retrained(ray_cluster, data):
    items = data.items[:200]
    index = ShardedClusterIndex(DIM, N_SHARDS, **ACTOR, n_clusters=4).train(items).add(items)
    try:
        with pytest.raises(ValueError, match="save needs a directory"):
            index.save()
        _kill(index.actors[1])
        with pytest.raises(RuntimeError, match="shard 1 died .* never saved"):
            index.search(data.queries, K)
        with pytest.raises(RuntimeError, match="shard 1 died .* never saved"):
            index.add(items)
        with pytest.raises(RuntimeError, match="cannot search: add failed part-way"):
            index.search(data.queries, K)
        index.train(items).add(items)  # on new actors
        assert index.ntotal == 200
        exact = (data.queries @ items.T).topk(K, dim=1).indices.numpy()
        np.testing.assert_array_equal(index.search(data.queries, K, ALL_LEAVES)[1], exact)
    finally:
        index.close()


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_arguments_raise(ray_cluster):
    with pytest.raises(ValueError, match="n_shards must be >= 1, got 0"):
        ShardedClusterIndex(DIM, 0)
    with pytest.raises(TypeError, match="dim must be an integer"):
        ShardedClusterIndex(2.5, 2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'n_leaves'"):
        ShardedClusterIndex(DIM, 2, n_leaves=3)
    with pytest.raises(TypeError, match="does not take progress"):
        ShardedClusterIndex(DIM, 2, progress=print)
    index = ShardedClusterIndex(DIM, 2, **ACTOR, reduction="l2")
    with pytest.raises(ValueError, match="reduction must be one of"):
        index.train(np.zeros((10, DIM)))
    index = ShardedClusterIndex(DIM, 3, **ACTOR)
    with pytest.raises(ValueError, match="the index must be trained before search"):
        index.search(np.zeros((1, DIM)), K)
    with pytest.raises(ValueError, match="trained before add"):
        index.add(np.zeros((1, DIM)))
    with pytest.raises(ValueError, match="at least one vector per shard"):
        index.train(np.ones((2, DIM)))
    with pytest.raises(ValueError, match="must have d = 24 columns"):
        index.train(np.ones((10, DIM + 1)))
    assert index.actors == ()  # nothing above started an actor


def test_bad_queries_raise(sharded):
    with pytest.raises(ValueError, match="queries must have d = 24 columns, got shape"):
        sharded.search(np.zeros((2, DIM - 1)), K)
    with pytest.raises(ValueError, match="k must be >= 1"):
        sharded.search(np.zeros((2, DIM)), 0)
    with pytest.raises(ValueError, match="branches must be >= 1"):
        sharded.search(np.zeros((2, DIM)), K, branches=0)
    with pytest.raises(ValueError, match="only finite values"):
        sharded.search(np.full((2, DIM), np.nan), K)
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        sharded.search("queries", K)
    scores, ids = sharded.search(np.zeros((0, DIM)), K)
    assert scores.shape == ids.shape == (0, K)


def test_package_imports_without_ray():
    code = ("import sys; sys.modules['ray'] = None\n"
            "from triptych.mips import ShardedClusterIndex\n"
            "try:\n    ShardedClusterIndex(4, 2)\nexcept ImportError as err:\n    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert "pip install 'triptych[distributed]'" in out.stdout
