"""Target-set clips (GTZAN / MagnaTagATune layouts) that cannot be decoded are left out and
recorded with their reason, never fatal and never silently dropped."""

import io

import numpy as np
import soundfile as sf

from deepcontent.evaluate.stage import _clip_mels, _gtzan
from support import config_for


def test_undecodable_and_missing_clips_are_recorded_with_a_reason(file_storage, tmp_path):
    cfg = config_for(file_storage, tmp_path)
    base = file_storage.raw_uri(cfg.storage.raw_prefix, cfg.sources.gtzan)
    buf = io.BytesIO()
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(22050 * 3) / 22050).astype(np.float32)
    sf.write(buf, tone, 22050, format="WAV", subtype="PCM_16")
    file_storage.write_bytes(f"{base}/blues/blues.00000.wav", buf.getvalue())
    file_storage.write_bytes(f"{base}/rock/rock.00000.wav", b"not audio at all")
    mels, labels, skipped = _gtzan(cfg, file_storage)
    assert labels == ["blues"] and len(mels) == 1 and mels[0].shape[0] == cfg.spectrograms.n_mels
    assert list(skipped) == [f"{base}/rock/rock.00000.wav"] and "undecodable" in skipped[f"{base}/rock/rock.00000.wav"]

    _, kept, missing = _clip_mels(cfg, file_storage, [f"{base}/nowhere.wav"])
    assert kept == [] and "not found" in next(iter(missing.values()))
