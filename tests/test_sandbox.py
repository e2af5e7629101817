"""The isolated decoder's transport: results cross the shared-memory region unchanged, at any size."""

import numpy as np
import pytest

from deepcontent.config import load_config
from deepcontent.engines.sandbox import SHARED_INITIAL_BYTES, SHARED_MAX_BYTES, Failure, IsolatedWorker, SharedRegion

SETTINGS = load_config(None, environ={}).spectrograms.mel_settings()


def test_region_lays_buffers_out_and_follows_the_other_side_growing():
    region = SharedRegion.create(size=16)
    if region is None:
        pytest.skip("no memfd_create here: the decoder uses the pipe alone")
    assert region.write([b"abc", memoryview(b"de")]) == [3, 2]
    assert region.read_copies([3, 2]) == [bytearray(b"abc"), bytearray(b"de")]
    other = SharedRegion(region.fd, region.size)  # a second mapping of the same file, as the child has
    other.write([b"x" * 100])  # grows the file
    assert region.read_copies([100]) == [bytearray(b"x" * 100)] and region.size >= 100
    region.close()


@pytest.mark.parametrize("nbytes", [0, 1000, SHARED_INITIAL_BYTES * 3 + 7, SHARED_MAX_BYTES + 1])
def test_payloads_of_any_size_cross_unchanged(nbytes):
    """In and out through the region, grown past its first size; above its bound, the pipe."""
    data = np.random.default_rng(nbytes).bytes(nbytes)
    with IsolatedWorker("spectro_faults:echo_payload", timeout_s=60) as worker:
        out = worker.call(data, settings=None)
        assert out["n"] == nbytes and out["echo"].tobytes() == data
        assert out["as_float16"].dtype == np.float16 and out["as_float16"].tobytes() == data[: nbytes // 2 * 2]
        assert out["echo"].flags.writeable  # the caller owns a copy, not a view of the reused region
        assert worker.last_ipc_s is not None and worker.last_ipc_s >= 0
        if worker._region is not None and 0 < nbytes <= SHARED_MAX_BYTES:
            assert worker._region.size >= nbytes


def test_a_crash_after_the_region_grew_leaves_the_next_call_intact():
    big = np.random.default_rng(1).bytes(SHARED_INITIAL_BYTES * 2)
    with IsolatedWorker("spectro_faults:compute_with_faults", timeout_s=60) as worker:
        assert isinstance(worker.call(b"not audio" * 10, settings=SETTINGS), Failure)
        worker.call(big, settings=SETTINGS)  # undecodable, but the region grew for it
        crashed = worker.call(b"CRASH" + big, settings=SETTINGS)
        assert isinstance(crashed, Failure) and crashed.reason == "crashed"
    with IsolatedWorker("spectro_faults:echo_payload", timeout_s=60) as worker:
        worker.call(big, settings=None)
        assert worker.call(b"abc", settings=None)["echo"].tobytes() == b"abc"
