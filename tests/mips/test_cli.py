"""``triptych mips build|search|eval``: a round trip through files agrees with the library."""

from __future__ import annotations

import numpy as np
import pytest

from triptych.cli import main
from triptych.mips import ClusterIndex


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    items = (rng.standard_normal((1500, 8)) * rng.lognormal(0, 0.5, (1500, 1))).astype(np.float32)
    queries = rng.standard_normal((40, 8)).astype(np.float32)
    np.save(tmp_path / "items.npy", items)
    np.save(tmp_path / "queries.npy", queries)
    truth = np.argsort(-(queries @ items.T), axis=1)[:, :10]
    np.save(tmp_path / "truth.npy", truth)
    return tmp_path, items, queries, truth


def test_build_search_eval_round_trip(files, capsys):
    tmp, items, queries, truth = files
    assert main(["mips", "build", str(tmp / "items.npy"), "-o", str(tmp / "index.tpx"), "--clusters", "40",
                 "--seed", "1", "--quiet", "--threads", "1"]) == 0
    assert "built" in capsys.readouterr().out
    index = ClusterIndex.load(tmp / "index.tpx")
    assert index.ntotal == 1500 and index.n_leaves == 40 and index.seed == 1

    assert main(["mips", "search", str(tmp / "index.tpx"), str(tmp / "queries.npy"), "-k", "10",
                 "-o", str(tmp / "out.npz"), "--branches", "40"]) == 0
    with np.load(tmp / "out.npz") as out:
        np.testing.assert_array_equal(out["ids"], truth)  # every leaf probed: exact
        assert out["scores"].shape == (40, 10) and out["scores"].dtype == np.float32
    library = index.search(queries, 10, branches=5)
    assert main(["mips", "search", str(tmp / "index.tpx"), str(tmp / "queries.npy"), "-k", "10",
                 "-o", str(tmp / "five.npz"), "--branches", "5"]) == 0
    with np.load(tmp / "five.npz") as out:
        np.testing.assert_array_equal(out["ids"], library[1])

    capsys.readouterr()
    assert main(["mips", "eval", str(tmp / "index.tpx"), str(tmp / "queries.npy"), "--ground-truth",
                 str(tmp / "truth.npy"), "-k", "10", "--branches", "40"]) == 0
    assert "recall@10 = 1.0000" in capsys.readouterr().out
    assert main(["mips", "eval", str(tmp / "index.tpx"), str(tmp / "queries.npy"), "-k", "10",
                 "--branches", "2"]) == 0
    printed = capsys.readouterr().out
    recall = float(printed.split("recall@10 = ")[1].split()[0])
    assert 0.0 < recall < 1.0 and "QPS" in printed


def test_errors_are_reported_not_raised(files, capsys):
    tmp, *_ = files
    assert main(["mips", "build", str(tmp / "missing.npy"), "-o", str(tmp / "x.tpx")]) == 2
    assert "cannot read vectors" in capsys.readouterr().err
    (tmp / "bad.tpx").write_bytes(b"nonsense")
    assert main(["mips", "search", str(tmp / "bad.tpx"), str(tmp / "queries.npy"), "-o", str(tmp / "o.npz")]) == 2
    assert "not a triptych MIPS index" in capsys.readouterr().err
    assert main(["mips", "build", str(tmp / "items.npy"), "-o", str(tmp / "i.tpx"), "--quiet"]) == 0
    np.save(tmp / "wide.npy", np.zeros((3, 9), dtype=np.float32))
    assert main(["mips", "search", str(tmp / "i.tpx"), str(tmp / "wide.npy"), "-o", str(tmp / "o.npz")]) == 2
    assert "d = 8 columns" in capsys.readouterr().err
    assert main(["mips", "eval", str(tmp / "i.tpx"), str(tmp / "queries.npy"), "--ground-truth",
                 str(tmp / "truth.npy"), "-k", "20"]) == 2
    assert "ground-truth ids must have shape (40, >= 20)" in capsys.readouterr().err
