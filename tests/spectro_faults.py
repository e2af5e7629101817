"""A decoder that misbehaves on cue, for the spectrogram stage's fault tests.

Real decoders that hang or crash are rare and not reproducible on demand, so the stage's
isolation is tested with this stand-in: it hangs for input starting with ``HANG``, aborts the
process (as a segfaulting native decoder would) for ``CRASH``, and otherwise runs the real
:func:`deepcontent.audio.features.compute_log_mel`.
"""

import os
import time

from deepcontent.audio.features import compute_log_mel


def compute_with_faults(data: bytes, *, settings):
    if data.startswith(b"HANG"):
        time.sleep(3600)
    if data.startswith(b"CRASH"):
        os.abort()
    return compute_log_mel(data, settings=settings)


# Clips whose SHA-256 is listed in this file hang (a transient fault: the same bytes decode once
# the file no longer lists them). A fixed path, because the decoder runs in a Spark worker's
# child process, whose environment was fixed when the test session's Spark started.
HANG_LIST = os.path.join(__import__("tempfile").gettempdir(), "deepcontent-tests-hang-shas.txt")


def compute_flaky(data: bytes, *, settings):
    import hashlib

    try:
        with open(HANG_LIST) as f:
            listed = set(f.read().split())
    except FileNotFoundError:
        listed = set()
    if hashlib.sha256(data).hexdigest() in listed:
        time.sleep(3600)
    return compute_log_mel(data, settings=settings)


def echo_payload(data: bytes, *, settings=None):
    """The input's bytes back as a uint8 array (and a float16 view of them), to test that
    payloads of any size cross the isolated decoder's transport unchanged."""
    import numpy as np

    raw = np.frombuffer(bytes(data), dtype=np.uint8).copy()
    half = raw[: raw.size // 2 * 2].view(np.float16)
    return {"echo": raw, "as_float16": half, "n": len(data)}
