"""Precision, recall, speedups and Pareto fronts on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from triptych.mips.metrics import (
    dot_product_speedup,
    hits_per_query,
    interpolate_at,
    is_dominated,
    pareto_front,
    precision_at_k,
    recall_at_k,
    wall_clock_speedup,
)

TRUE = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])


def test_precision_counts_set_overlap_not_order():
    found = np.array([[1, 0, 9, 9], [7, 6, 5, 4]])
    assert hits_per_query(found, TRUE, 2).tolist() == [2, 0]  # {1, 0} = {0, 1}; {7, 6} ∩ {4, 5} = ∅
    assert hits_per_query(found, TRUE, 4).tolist() == [2, 4]  # the same items in reverse order all count


def test_precision_at_k_hand_made():
    found = np.array([[1, 0, 9, 8], [7, 6, 5, 4]])
    assert precision_at_k(found, TRUE, 1) == pytest.approx(0.0)  # 1 ≠ 0 and 7 ≠ 4
    assert precision_at_k(found, TRUE, 2) == pytest.approx((2 / 2 + 0 / 2) / 2)
    assert precision_at_k(found, TRUE, 4) == pytest.approx((2 / 4 + 4 / 4) / 2)


def test_padding_and_duplicates_never_count():
    found = np.array([[0, 0, -1, -1], [-1, -1, -1, -1]])
    assert hits_per_query(found, TRUE, 4).tolist() == [1, 0]
    true_with_minus = np.array([[-1, 1, 2, 3], [4, 5, 6, 7]])
    assert hits_per_query(np.full((2, 4), -1), true_with_minus, 4).tolist() == [0, 0]


def test_recall_with_a_deeper_answer_and_torch_input():
    found = torch.tensor([[9, 8, 0, 1], [4, 9, 9, 9]])
    assert recall_at_k(found, TRUE, 2) == pytest.approx((0 + 1 / 2) / 2)
    assert recall_at_k(found, TRUE, 2, n_found=4) == pytest.approx((2 / 2 + 1 / 2) / 2)


def test_bad_ids_are_refused():
    with pytest.raises(ValueError, match="one row per query"):
        precision_at_k(TRUE[:1], TRUE, 1)
    with pytest.raises(ValueError, match="integer matrix"):
        precision_at_k(TRUE.astype(float), TRUE, 1)
    with pytest.raises(ValueError, match="k_true must be <= 4"):
        precision_at_k(TRUE, TRUE, 5)


def test_speedups():
    assert dot_product_speedup(1000, 50.0) == pytest.approx(20.0)
    assert wall_clock_speedup(2.0, 0.5) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="dot_products must be >"):
        dot_product_speedup(1000, 0.0)


def test_pareto_front_drops_dominated_points():
    gain = [10.0, 5.0, 8.0, 1.0, 8.0]
    quality = [0.2, 0.9, 0.1, 0.95, 0.5]
    front = pareto_front(gain, quality)
    assert front.tolist() == [0, 4, 1, 3]  # (8, 0.1) is dominated by (8, 0.5)
    assert np.all(np.diff(np.asarray(gain)[front]) < 0) and np.all(np.diff(np.asarray(quality)[front]) > 0)


def test_interpolate_at_reads_the_front_linearly():
    gain, quality = [100.0, 50.0, 10.0, 1.0], [0.5, 0.8, 0.9, 1.0]
    assert interpolate_at(gain, quality, 0.85) == pytest.approx(30.0)
    assert interpolate_at(gain, quality, 0.9) == pytest.approx(10.0)
    assert interpolate_at(gain, quality, 0.3) == pytest.approx(100.0)  # the fastest point already reaches it
    assert interpolate_at(gain, quality[:-1] + [0.95], 0.99) is None


def test_is_dominated():
    result = is_dominated([10.0, 2.0], [0.5, 0.9], [5.0, 5.0, 20.0], [0.4, 0.6, 0.1], tolerance=0.0)
    assert result.tolist() == [True, False, False]
    assert is_dominated([10.0], [0.5], [5.0], [0.55], tolerance=0.1).tolist() == [True]
