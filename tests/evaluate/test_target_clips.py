"""Target-set clips (GTZAN / MagnaTagATune layouts) that cannot be decoded are left out and
recorded with their reason, never fatal and never silently dropped."""

import io

import numpy as np
import soundfile as sf

from deepcontent.stages.evaluate import gtzan_clips as _gtzan
from deepcontent.stages.evaluate import target_clip_mels as _clip_mels
from support import config_for


def test_undecodable_and_missing_clips_are_recorded_with_a_reason(file_storage, tmp_path):
    cfg = config_for(file_storage, tmp_path)
    base = file_storage.raw_uri(cfg.storage.raw_prefix, cfg.sources.gtzan)
    buf = io.BytesIO()
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(22050 * 3) / 22050).astype(np.float32)
    sf.write(buf, tone, 22050, format="WAV", subtype="PCM_16")
    file_storage.write_bytes(f"{base}/blues/blues.00000.wav", buf.getvalue())
    file_storage.write_bytes(f"{base}/rock/rock.00000.wav", b"not audio at all")
    clips, labels, skipped = _gtzan(cfg, file_storage)
    mels = clips["mel"]
    assert labels == ["blues"] and len(mels) == 1 and mels[0].shape[0] == cfg.spectrograms.n_mels
    assert list(skipped) == [f"{base}/rock/rock.00000.wav"] and "undecodable" in skipped[f"{base}/rock/rock.00000.wav"]

    _, kept, missing = _clip_mels(cfg, file_storage, [f"{base}/nowhere.wav"])
    assert kept == [] and "not found" in next(iter(missing.values()))


def test_late_fusion_decodes_harmonic_and_percussive_parts_of_each_clip(file_storage, tmp_path):
    cfg = config_for(file_storage, tmp_path)
    base = file_storage.raw_uri(cfg.storage.raw_prefix, cfg.sources.gtzan)
    t = np.arange(22050 * 3) / 22050
    tone = 0.3 * np.sin(2 * np.pi * 440 * t)
    clicks = np.zeros_like(t)
    clicks[:: 22050 // 4] = 0.9  # four clicks a second: percussive energy
    for name, y in (("tone", tone), ("clicks", clicks)):
        buf = io.BytesIO()
        sf.write(buf, y.astype(np.float32), 22050, format="WAV", subtype="PCM_16")
        file_storage.write_bytes(f"{base}/{name}/{name}.00000.wav", buf.getvalue())
    clips, labels, skipped = _gtzan(cfg, file_storage, hpss=True)
    assert not skipped and set(clips) == {"mel", "harmonic", "percussive"}
    assert all(len(v) == 2 and v[0].shape == clips["mel"][0].shape for v in clips.values())
    compression = cfg.spectrograms.compression
    energy = {part: {lab: float(np.expm1(clips[part][i]).sum() / compression) for i, lab in enumerate(labels)}
              for part in ("harmonic", "percussive")}
    # the steady tone is mostly harmonic, the clicks mostly percussive
    assert energy["harmonic"]["tone"] > 5 * energy["percussive"]["tone"]
    assert energy["percussive"]["clicks"] > 5 * energy["harmonic"]["clicks"]
