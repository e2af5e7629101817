"""Named model variants: the CNNs the evaluation compares, as changes to the train config.

The train stage trains the production model from ``train`` as configured, and each name in
``train.variants`` from the same config with that variant's settings applied; variants are
registered under ``models/variants/<name>.json`` and never promoted. The evaluation's method of
the same name reads that pointer.

Every variant states what it reads and predicts, so a base config of another kind (a raw-audio
or a tag model in ``train``) cannot leak into a variant.
"""

from __future__ import annotations

from typing import Any

from deepcontent.config import Config, TrainConfig

__all__ = ["VARIANTS", "variant_config", "variants_reading_waveforms"]

_LISTENING = {"input": "log_mel", "targets": "plays"}

#: Variant name -> train settings it fixes (``raw_cnn`` adds its window from the hop length).
VARIANTS: dict[str, dict[str, Any]] = {
    "cnn_mse": {"model": "paper_cnn", "loss": "mse", **_LISTENING},
    "cnn_wpe": {"model": "paper_cnn", "loss": "wpe", **_LISTENING},
    "deep_cnn": {"model": "deep_cnn", "loss": "mse", **_LISTENING},
    # the raw-audio front end + paper CNN (thesis ch. 5), trained with MSE on mono waveforms
    "raw_cnn": {"model": "raw_audio", "input": "waveform", "targets": "plays", "loss": "mse", "gain_db": 0.0,
                "baseline": False},
    # the paper CNN (MSE) started from the pretrained backbone of evaluate.pretrained_model
    "cnn_finetuned": {"model": "paper_cnn", "loss": "mse", **_LISTENING},
    # the paper CNN regressing the tag-WMF song factors (the ISMIR 2014 tag source task)
    "cnn_tags": {"model": "paper_cnn", "loss": "mse", "input": "log_mel", "targets": "tags"},
}


def variant_config(cfg: Config, name: str) -> Config:
    """``cfg`` with variant ``name``'s train settings, validated together (a raw-audio model and
    its waveform input change at once), ``train.variant = name`` and no further variants.

    ``raw_cnn``'s window is the log-mel window's span in samples, and its front end's filters
    are one hop long, so the back end sees the spectrogram's frame rate.

    Raises
    ------
    ValueError
        For an unknown name (the message lists the known ones).
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown model variant {name!r}; known variants: {', '.join(VARIANTS)}")
    settings = dict(VARIANTS[name])
    if name == "cnn_finetuned":
        settings.update(init_from=cfg.evaluate.pretrained_model, init_registry_root=cfg.evaluate.pretrained_registry_root)
    if name == "raw_cnn":
        hop = cfg.spectrograms.hop_length
        frames = cfg.train.window_frames if cfg.train.input == "log_mel" else TrainConfig().window_frames
        settings.update(window_frames=frames * hop, window_seconds=None, model_params={"filter_length": hop})
    train = TrainConfig.model_validate({**cfg.train.model_dump(), **settings, "variants": (), "variant": name})
    return cfg.model_copy(update={"train": train})


def variants_reading_waveforms(cfg: Config) -> list[str]:
    """The variants of ``train.variants`` (and the production model, as ``"production"``) that
    read ``features/waveforms``."""
    out = ["production"] if cfg.train.input == "waveform" else []
    return out + [v for v in cfg.train.variants if VARIANTS.get(v, {}).get("input") == "waveform"]
