"""The MIPS reproduction end to end on a tiny configuration: sections, figures, numbers that hang together."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from triptych.data.vectors import gaussian_mips
from triptych.experiments import mips


def _tiny_set(seed: int):
    def load(config):
        data = gaussian_mips(n_items=1500, n_queries=40, dim=8, seed=seed + config.seed, k=1)
        return data.items, data.queries

    return load


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mips")
    config = dataclasses.replace(
        mips.make_config("quick", seed=0), threads=1, branches_1=(1, 4, 64), branches_2=(1, 4), l2_hashes=(4,),
        sign_hashes=(4,), simple_hashes=(4,), n_tables=4, tables_probed=(1, 4), pca_leaves=(1, 4),
        noise_sigmas=(0.0, 0.4), noise_speedup=2.0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mips, "DATASETS", {"A": _tiny_set(1), "B": _tiny_set(2)})
        report = mips.run(config, out)
    return config, report, out


def test_report_has_every_section_and_figure(tiny_run):
    _, report, out = tiny_run
    text = "\n".join(report.sections)
    for heading in ("## Setup", "## Targets", "## Precision vs speedup", "### A", "### B", "## Noise robustness"):
        assert heading in text
    assert "Clustering curves dominate every hashing and tree baseline on both data sets (within the" in text
    assert report.figures == ["mips_precision_vs_speedup.png", "mips_precision_vs_wallclock.png", "mips_noise.png"]
    for name in report.figures:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_rows_cover_every_method_and_are_consistent(tiny_run):
    config, report, _ = tiny_run
    result = report.results["datasets"]["A"]
    rows = result["rows"]
    assert {r["family"] for r in rows} == set(mips.COLORS)
    for row in rows:
        assert 0.0 <= row["p@1"] <= 1.0 and 0.0 <= row["p@100"] <= 1.0
        assert row["speedup"] == pytest.approx(result["n_items"] / row["dot_products"])
        assert row["candidates"] <= row["dot_products"]
    exhaustive = next(r for r in rows if r["family"] == "clustering, 1 level" and r["setting"] == 64)
    assert exhaustive["p@10"] == pytest.approx(1.0)  # more branches than leaves: exact
    hashing = [r for r in rows if r["family"] == "Sign-ALSH"]
    assert [r["setting"] for r in hashing][0] == 1 and hashing == sorted(hashing, key=lambda r: r["setting"])
    assert set(result["noise"]) == set(mips.COLORS)
    assert all(len(c["p@10"]) == len(config.noise_sigmas) for c in result["noise"].values())
    assert report.results["target_met"] in (True, False)


def test_noise_is_relative_to_the_query_norm():
    queries = torch.randn(2000, 16) * torch.logspace(-2, 2, 2000)[:, None]
    noisy = mips.noisy_queries(queries, 0.3, seed=0)
    ratio = torch.linalg.vector_norm(noisy - queries, dim=1) / torch.linalg.vector_norm(queries, dim=1)
    assert ratio.mean() == pytest.approx(0.3, rel=0.05)
    assert torch.equal(mips.noisy_queries(queries, 0.0, seed=0), queries)


def test_domination_lists_the_points_that_beat_clustering():
    rows = [{"family": "clustering, 1 level", "method": "c", "knob": "b", "setting": 1, "speedup": 10.0,
             "wall_speedup": 5.0, "p@1": 0.9, "p@10": 0.9, "p@100": 0.9},
            {"family": "PCA-tree", "method": "t", "knob": "l", "setting": 1, "speedup": 5.0, "wall_speedup": 6.0,
             "p@1": 0.5, "p@10": 0.95, "p@100": 0.5}]
    fast = {**rows[1], "method": "h", "speedup": 50.0, "p@10": 0.01}
    result = mips.domination([*rows, fast], tolerance=0.01)
    assert result["p@1/speedup"]["not_dominated"] == []
    assert result["p@10/speedup"]["not_dominated"] == ["t l=1"]
    assert result["p@10/speedup"]["beyond_reach"] == ["h l=1 (50×, p@10 0.010)"]  # faster than any clustering
    assert result["p@1/wall_speedup"]["not_dominated"] == []  # both beat the clustering's 5× wall clock …
    assert len(result["p@1/wall_speedup"]["beyond_reach"]) == 2  # … so neither can be judged


def test_paper_scale_is_refused():
    with pytest.raises(ValueError, match="scale must be one of"):
        mips.make_config("paper")
