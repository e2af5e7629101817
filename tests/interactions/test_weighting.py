"""Confidence weighting c = 1 + α log(1 + r/ε) and the Spark rating r′ = log(1 + r/ε)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from deepcontent.interactions.weighting import (
    canonical_csr,
    check_counts,
    confidence,
    confidence_matrix,
    log_rating_matrix,
    log_ratings,
)


def test_hand_values():
    np.testing.assert_allclose(confidence(np.array([1.0, 3.0]), alpha=2.0, eps=1.0),
                               [1 + 2 * np.log(2), 1 + 2 * np.log(4)])
    # ε rescales counts: r = ε gives log 2 whatever ε is
    assert confidence(np.array([0.5]), alpha=1.0, eps=0.5)[0] == pytest.approx(1 + np.log(2))
    np.testing.assert_allclose(log_ratings(np.array([1, 9]), eps=1.0), [np.log(2), np.log(10)])


def test_alpha_zero_gives_unit_confidence_and_shape_is_kept():
    counts = np.arange(1, 13, dtype=np.int32).reshape(3, 4)
    c = confidence(counts, alpha=0.0, eps=1.0)
    assert c.shape == (3, 4) and c.dtype == np.float64
    np.testing.assert_array_equal(c, 1.0)


def test_spark_rating_gives_the_same_confidence():
    # Spark MLlib's implicit ALS weights a rating r′ by 1 + alpha·r′.
    r = np.array([1, 2, 5, 100, 9_999], dtype=np.float64)
    for alpha, eps in [(2.0, 1.0), (40.0, 1e-6), (0.5, 10.0)]:
        np.testing.assert_allclose(1 + alpha * log_ratings(r, eps=eps), confidence(r, alpha=alpha, eps=eps), rtol=1e-15)
    assert (log_ratings(r, eps=1.0) > 0).all()  # so Spark's preference p = I(r′ > 0) = 1


def test_extreme_counts_stay_finite_and_monotone():
    r = np.array([1e-12, 1.0, 1e6, 2**31 - 1, 1e300])
    c = confidence(r, alpha=40.0, eps=1e-8)
    assert np.isfinite(c).all() and (np.diff(c) > 0).all() and (c >= 1).all()


def test_matrix_keeps_sparsity_and_orientation():
    counts = sp.csr_matrix(np.array([[0, 3, 0, 1], [0, 0, 0, 0], [7, 0, 2, 0]], dtype=np.int32))
    c = confidence_matrix(counts, alpha=2.0, eps=1.0)
    assert isinstance(c, sp.csr_matrix) and c.shape == (3, 4) and c.nnz == 4
    np.testing.assert_array_equal(c.indptr, counts.indptr)
    np.testing.assert_array_equal(c.indices, counts.indices)
    np.testing.assert_allclose(c.toarray()[counts.toarray() > 0], confidence(counts.data, alpha=2.0, eps=1.0))
    assert confidence_matrix(counts, alpha=2.0, eps=1.0, dtype=np.float32).dtype == np.float32
    r = log_rating_matrix(counts, eps=1.0)
    np.testing.assert_allclose(1 + 2.0 * r.data, c.data)
    assert counts.dtype == np.int32 and counts.data[0] == 3  # input untouched


def test_matrix_from_coo_sums_duplicates():
    coo = sp.coo_matrix(([1.0, 2.0, 4.0], ([0, 0, 1], [1, 1, 0])), shape=(2, 2))
    c = confidence_matrix(coo, alpha=1.0, eps=1.0)
    assert c.nnz == 2
    assert c[0, 1] == pytest.approx(1 + np.log(4))  # 1 + 2 plays of the same pair = 3
    assert canonical_csr(coo).has_canonical_format


@pytest.mark.parametrize(
    "values, match",
    [
        ([1.0, -2.0, 3.0], r"1 of 3 counts are not finite and > 0 \(1 negative\); e\.g\. -2\.0"),
        ([0.0, 1.0, 0.0], r"2 of 3 counts .*\(2 zero\); e\.g\. 0\.0 at flat index 0"),
        ([1.0, np.nan], r"1 of 2 counts .*\(1 NaN\); e\.g\. nan"),
        ([np.inf, 1.0, -np.inf], r"2 of 3 counts .*\(2 inf, 1 negative\)"),
        (np.array([1, 0, -5], dtype=np.int64), r"2 of 3 counts .*1 negative, 1 zero"),
    ],
)
def test_bad_counts_are_refused_with_how_many_and_an_example(values, match):
    with pytest.raises(ValueError, match=match):
        confidence(np.asarray(values), alpha=1.0, eps=1.0)
    with pytest.raises(ValueError, match=match):
        check_counts(np.asarray(values))


def test_bad_counts_in_a_matrix_including_explicit_zeros():
    m = sp.csr_matrix(np.array([[1.0, 2.0], [3.0, 4.0]]))
    m.data[2] = 0.0  # an explicitly stored zero is not "no play"
    with pytest.raises(ValueError, match=r"1 of 4 stored counts of the 2x2 matrix .*1 zero"):
        confidence_matrix(m, alpha=1.0, eps=1.0)
    m.data[2] = np.nan
    with pytest.raises(ValueError, match=r"1 NaN"):
        log_rating_matrix(m, eps=1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": -1.0, "eps": 1.0}, r"alpha must be a finite number >= 0, got -1\.0"),
        ({"alpha": np.inf, "eps": 1.0}, r"alpha .* got inf"),
        ({"alpha": 1.0, "eps": 0.0}, r"eps must be a finite number > 0, got 0\.0"),
        ({"alpha": 1.0, "eps": np.nan}, r"eps .* got nan"),
    ],
)
def test_bad_parameters_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        confidence(np.array([1.0]), **kwargs)


def test_dense_input_to_matrix_helpers_is_a_type_error():
    with pytest.raises(TypeError, match=r"scipy\.sparse .* got ndarray"):
        confidence_matrix(np.ones((2, 2)), alpha=1.0, eps=1.0)
    with pytest.raises(ValueError, match="numeric"):
        check_counts(np.array(["1", "2"]))
