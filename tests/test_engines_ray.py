"""Releasing the object store's pages from a process's resident set, on plain shared memory
(no Ray here: the train-stage tests check it on Ray's own store)."""

from __future__ import annotations

import mmap
import os
import pathlib
import shutil
import tempfile

import pytest

from deepcontent.engines.ray import release_object_store_pages

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/maps") or not os.path.isdir("/dev/shm"),
                                reason="needs Linux /proc and /dev/shm")

MIB = 2**20


def _rss(kind: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(f"Rss{kind}"))


def _mapped(folder, name: str, *, shared: bool, size: int = 16 * MIB):
    path = folder / name
    with open(path, "wb") as f:
        f.truncate(size)
    fd = os.open(path, os.O_RDWR)
    m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE)
    os.close(fd)
    for i in range(0, size, mmap.PAGESIZE):
        m[i] = 7
    return m


@pytest.fixture
def shm_dir():
    """A folder in /dev/shm (tmpfs, where Ray's store keeps its file), removed afterwards."""
    d = tempfile.mkdtemp(prefix="deepcontent-test-", dir="/dev/shm")
    try:
        yield pathlib.Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_shared_store_pages_leave_the_resident_set_and_keep_their_data(shm_dir):
    store = _mapped(shm_dir, "plasmaAbc123", shared=True)
    other = _mapped(shm_dir, "not-the-store", shared=True)
    before = _rss("Shmem")
    released = release_object_store_pages()
    assert released >= 16 * MIB
    assert _rss("Shmem") <= before - 15 * MIB  # the store's pages went, the other mapping's stayed
    assert _rss("Shmem") >= 15 * MIB
    assert store[0] == 7 and store[16 * MIB - mmap.PAGESIZE] == 7 and other[0] == 7


def test_a_private_mapping_of_a_store_named_file_is_never_touched(shm_dir):
    """Dropping a private mapping's pages would lose what the process wrote into them."""
    private = _mapped(shm_dir, "plasmaPrivate", shared=False)  # written pages: copies only this process has
    release_object_store_pages()
    assert private[0] == 7 and private[8 * MIB] == 7  # (the file itself holds zeros)


def test_nothing_to_release_without_maps(tmp_path):
    assert release_object_store_pages(maps_path=str(tmp_path / "absent")) == 0
