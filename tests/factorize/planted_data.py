"""Data with a known answer for the factorisation tests: a planted block structure.

Users fall in ``k`` taste groups and items in ``k`` matching groups; each user plays mostly items
of their own group (popular ones more often: item popularity is log-normal), a few at random
elsewhere, with Zipf play counts. Any WMF that works recovers the groups: held-out plays are
ranked far above chance and above the popularity baseline. One extra user and one extra item
have no plays at all (their factors must come back as zeros).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

PARAMS = dict(factors=8, alpha=2.0, eps=1.0, regularization=0.1, iterations=15, seed=0)


@dataclass
class Planted:
    train: sp.csr_matrix  # (n_users, n_items) counts
    test: sp.csr_matrix  # (n_users, n_items) held-out counts
    user_group: np.ndarray  # (n_users,), -1 for the empty user
    item_group: np.ndarray  # (n_items,), -1 for the empty item


def planted_blocks(
    *, n_users: int = 300, n_items: int = 200, k: int = 4, per_user: int = 20, noise: float = 0.05, seed: int = 0
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    user_group = rng.integers(0, k, n_users)
    item_group = np.arange(n_items) % k
    pop = rng.lognormal(0.0, 1.0, n_items)
    rows, cols = [], []
    for u in range(n_users):
        n = max(2, rng.poisson(per_user))
        own = np.flatnonzero(item_group == user_group[u])
        other = np.flatnonzero(item_group != user_group[u])
        n_other = rng.binomial(n, noise)
        n_own = min(n - n_other, len(own))
        items = np.concatenate([
            rng.choice(own, n_own, replace=False, p=pop[own] / pop[own].sum()),
            rng.choice(other, n_other, replace=False, p=pop[other] / pop[other].sum()),
        ])
        rows += [u] * len(items)
        cols += list(items)
    counts = np.minimum(rng.zipf(2.0, len(rows)), 500).astype(np.float64)
    m = sp.csr_matrix((counts, (rows, cols)), shape=(n_users, n_items))
    return m, user_group, item_group


def split_per_user(m: sp.csr_matrix, *, fraction: float, seed: int) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Hold out ``fraction`` of each user's plays (at least one, for users with two or more)."""
    rng = np.random.default_rng(seed)
    coo = m.tocoo()
    is_test = np.zeros(m.nnz, dtype=bool)
    for u in range(m.shape[0]):
        idx = np.flatnonzero(coo.row == u)
        if len(idx) >= 2:
            is_test[rng.choice(idx, max(1, round(fraction * len(idx))), replace=False)] = True

    def part(mask):
        return sp.csr_matrix((coo.data[mask], (coo.row[mask], coo.col[mask])), shape=m.shape)

    return part(~is_test), part(is_test)


def planted_data() -> Planted:
    m, user_group, item_group = planted_blocks()
    train, test = split_per_user(m, fraction=0.2, seed=1)

    def pad(x: sp.csr_matrix) -> sp.csr_matrix:  # one more user and one more item, without plays
        return sp.csr_matrix(sp.block_diag([x, sp.csr_matrix((1, 1))], format="csr"))

    return Planted(train=pad(train), test=pad(test), user_group=np.append(user_group, -1),
                   item_group=np.append(item_group, -1))
