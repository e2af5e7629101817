"""Fixtures for the factorisation tests (the data itself is in ``planted_data.py``)."""

from __future__ import annotations

import pytest

from planted_data import Planted, planted_data


@pytest.fixture(scope="session")
def planted() -> Planted:
    """The planted block structure, split per user 80/20 (see ``planted_data``)."""
    return planted_data()
