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
