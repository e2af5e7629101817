"""Top-k cosine neighbours against a brute-force ranking on data with a known answer."""

import numpy as np
import pytest

from deepcontent.embed.similarity import top_k_cosine


def _brute(x, k):
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = u @ u.T
    np.fill_diagonal(s, -np.inf)
    idx = np.array([sorted(range(len(x)), key=lambda j: (-s[i, j], j))[:k] for i in range(len(x))])
    return idx, np.take_along_axis(s, idx, axis=1)


@pytest.mark.parametrize("block_rows", [1, 7, 2048])
def test_matches_brute_force_whatever_the_block_size(block_rows):
    x = np.random.default_rng(0).standard_normal((53, 6)).astype(np.float32)
    idx, score = top_k_cosine(x, k=5, block_rows=block_rows)
    want_idx, want_score = _brute(x.astype(np.float64), 5)
    assert idx.shape == (53, 5) and idx.dtype == np.int64 and score.dtype == np.float32
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(score, want_score, atol=1e-5)
    assert (idx != np.arange(53)[:, None]).all()  # never yourself
    assert (np.diff(score, axis=1) <= 1e-7).all()  # best first


def test_planted_pairs_find_each_other():
    # Tracks 2k and 2k+1 point the same way (different lengths): each is the other's nearest.
    rng = np.random.default_rng(1)
    base = rng.standard_normal((10, 8))
    x = np.repeat(base, 2, axis=0) * rng.uniform(0.5, 3.0, size=(20, 1))
    idx, score = top_k_cosine(x, k=1)
    np.testing.assert_array_equal(idx[:, 0], np.arange(20) ^ 1)
    np.testing.assert_allclose(score[:, 0], 1.0, atol=1e-5)


def test_small_catalogs_zero_rows_and_bad_input():
    idx, score = top_k_cosine(np.eye(3), k=10)  # k larger than n - 1: every other row
    assert idx.shape == (3, 2)
    idx, score = top_k_cosine(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), k=2)
    assert (score[0] == 0).all()  # an all-zero vector is similar to nothing
    assert top_k_cosine(np.ones((1, 4)), k=3)[0].shape == (1, 0)
    with pytest.raises(ValueError, match="1 row"):
        top_k_cosine(np.array([[1.0, np.nan], [1.0, 2.0]]), k=1)
    with pytest.raises(ValueError, match="k must be"):
        top_k_cosine(np.eye(3), k=0)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        top_k_cosine(np.ones(3), k=1)
