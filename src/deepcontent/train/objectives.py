"""What one training step minimises and how validation scores it: the train loop's objectives.

The Ray Train loop (:mod:`deepcontent.train.loop`) is the same for every model the system
trains — clips resident or streamed, DDP, checkpoints, early stopping — and asks its objective
three things:

``loss(model, bank, idx, generator)``
    the loss of one step on clips ``idx`` of a :class:`~deepcontent.train.data.ClipBank`;
``validate(model, clips)``
    partial sums over this worker's validation clips (a list of floats, summed over ranks);
``summary(sums)``
    the validation metrics from the summed partials, with :attr:`metric` (lower is better) the
    one early stopping follows.

:class:`Regression` (the ``train`` stage)
    random windows (optionally gain-augmented) -> predicted standardised factors; MSE or WPE;
    validated by the NMSE of clip-level predictions (mean over consecutive windows).

:class:`Contrastive` (the ``pretrain`` stage)
    two random windows of each clip, each augmented on its own (random gain, time and frequency
    masks), through the same backbone whose output layer is a projection; InfoNCE
    (:func:`info_nce`): the other window of the same clip is the positive, every other clip's
    windows in the batch are negatives (COLA / SimCLR style, no labels: every catalog clip can
    be used, played or not). Validated by the InfoNCE loss and the top-1 accuracy of finding the
    positive, on fixed window pairs of the held-out clips, so epochs compare.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from deepcontent.models import random_gain
from deepcontent.models.augment import frequency_mask, time_mask
from deepcontent.train.losses import gram_matrix, item_plays, mse_loss, wpe_loss

__all__ = ["Contrastive", "Regression", "info_nce", "make_objective"]


def info_nce(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE of paired views and how many positives rank first.

    Parameters
    ----------
    z1, z2 : torch.Tensor [shape=(batch, d)]
        Projections of two views; row i of each is the same clip. L2-normalised here.
    temperature : float > 0
        Divides the cosine similarities.

    Returns
    -------
    loss : torch.Tensor [shape=()]
        Mean over the ``2·batch`` anchors of the cross-entropy of picking the other view of
        the same clip among the other ``2·batch - 1`` views.
    correct : torch.Tensor [shape=()]
        Anchors whose positive has the highest similarity (for an accuracy).

    Raises
    ------
    ValueError
        For mismatched shapes, fewer than 2 pairs (no negative) or a non-positive temperature.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be (batch, d), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError(f"InfoNCE needs at least 2 pairs (one negative), got {z1.shape[0]}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.T) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))  # not itself
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    loss = F.cross_entropy(sim, positive)
    correct = (sim.argmax(dim=1) == positive).sum()
    return loss, correct


class Regression:
    """Windows -> standardised factors, MSE or WPE; validation NMSE of clip predictions.

    Parameters
    ----------
    cfg : TrainConfig
    config : dict
        The loop config (``valid_variance``, ``target_mean`` / ``target_std``, ``wpe``).
    device : torch.device
    autocast : callable
        The forward-pass context (bf16 autocast on GPU).
    """

    metric = "valid_nmse"

    def __init__(self, cfg, config: dict, *, device: torch.device, autocast: Callable[[], Any]) -> None:
        self.cfg, self.device, self.autocast = cfg, device, autocast
        self.valid_variance = config["valid_variance"]
        self.wpe = None
        if cfg.loss == "wpe":
            import ray

            item_users, user_factors = ray.get(config["wpe"])
            self.wpe = _WPE(item_users, user_factors, mean=torch.as_tensor(config["target_mean"], dtype=torch.float32),
                            std=torch.as_tensor(config["target_std"], dtype=torch.float32), device=device)

    def loss(self, model: torch.nn.Module, bank, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        x = bank.random_windows(idx, n_frames=cfg.window_frames, generator=generator)
        if cfg.gain_db > 0:
            x = random_gain(x, max_db=cfg.gain_db, generator=generator)
        with self.autocast():
            pred = model(x)
        pred = pred.float()
        return self.wpe(pred, bank.items[idx.cpu()]) if self.wpe is not None else mse_loss(pred, bank.targets[idx])

    def validate(self, model: torch.nn.Module, clips) -> list[float]:
        """``[sum of squared errors, values]`` of clip-level predictions over ``clips``, scored
        a few clips at a time (about ``eval_batch_size`` windows), so the windows of a whole
        shard are never materialised at once."""
        from deepcontent.train.loop import predict_clips

        n_frames, batch_size = self.cfg.window_frames, self.cfg.eval_batch_size
        sse, n_values = 0.0, 0
        for bank in clips.banks():
            windows = ((bank.lengths - n_frames).clamp(min=0) // n_frames + 2).tolist()  # an upper bound per clip
            start = 0
            while start < len(bank):
                stop, total = start, 0
                while stop < len(bank) and (stop == start or total + windows[stop] <= batch_size):
                    total += windows[stop]
                    stop += 1
                preds = predict_clips(model, [bank.clip(i) for i in range(start, stop)], n_frames=n_frames,
                                      batch_size=batch_size, autocast=self.autocast)
                sse += float(((preds - bank.targets[start:stop]) ** 2).sum())
                n_values += preds.numel()
                start = stop
        return [sse, float(n_values)]

    def summary(self, sums: list[float]) -> dict[str, float]:
        sse, n_values = sums
        return {"valid_nmse": (sse / n_values) / self.valid_variance if n_values else float("nan")}


class _WPE:
    """The WPE objective's fixed data on one worker: ``c_ui`` of the train songs' plays
    (items × users CSR), the user factors and their Gram matrix; predictions are
    un-standardised first, because WMF scores are ``x_u · y_i`` in raw factor units."""

    def __init__(self, item_users, user_factors, *, mean: torch.Tensor, std: torch.Tensor, device: torch.device) -> None:
        self.item_users = item_users
        self.users = torch.as_tensor(user_factors, dtype=torch.float32, device=device)
        self.gram = gram_matrix(self.users)
        self.mean, self.std = mean.to(device), std.to(device)

    def __call__(self, pred: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        users, conf = item_plays(self.item_users, items.cpu().numpy())
        raw = pred * self.std + self.mean
        return wpe_loss(raw, user_factors=self.users, gram=self.gram, play_users=users, play_confidence=conf)


class Contrastive:
    """Two augmented windows per clip, InfoNCE on the projections (see the module docstring).

    Parameters
    ----------
    cfg : TrainConfig
        The loop's settings (window, gain, batch and eval batch sizes, seed).
    objective : dict
        ``temperature``, ``time_masks``, ``time_mask_frames``, ``freq_masks``, ``freq_mask_bands``
        and optionally ``valid_pairs`` (window pairs per held-out clip in :meth:`validate`; 1).
    device, autocast
        As :class:`Regression`.
    """

    metric = "valid_loss"

    def __init__(self, cfg, objective: dict, *, device: torch.device, autocast: Callable[[], Any]) -> None:
        self.cfg, self.device, self.autocast = cfg, device, autocast
        self.temperature = float(objective["temperature"])
        self.masks = {k: int(objective[k]) for k in ("time_masks", "time_mask_frames", "freq_masks", "freq_mask_bands")}
        self.valid_pairs = int(objective.get("valid_pairs", 1))
        if self.valid_pairs < 1:
            raise ValueError(f"valid_pairs must be at least 1, got {self.valid_pairs}")

    def _augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        m = self.masks
        if self.cfg.gain_db > 0:
            x = random_gain(x, max_db=self.cfg.gain_db, generator=generator)
        x = time_mask(x, masks=m["time_masks"], max_frames=m["time_mask_frames"], generator=generator)
        return frequency_mask(x, masks=m["freq_masks"], max_bands=m["freq_mask_bands"], generator=generator)

    def _views(self, model: torch.nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.autocast():
            z = model(torch.cat([x1, x2]))
        z = z.float()
        return z[: len(x1)], z[len(x1):]

    def loss(self, model: torch.nn.Module, bank, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n_frames = self.cfg.window_frames
        x1 = self._augment(bank.random_windows(idx, n_frames=n_frames, generator=generator), generator)
        x2 = self._augment(bank.random_windows(idx, n_frames=n_frames, generator=generator), generator)
        z1, z2 = self._views(model, x1, x2)
        return info_nce(z1, z2, temperature=self.temperature)[0]

    @torch.no_grad()
    def validate(self, model: torch.nn.Module, clips) -> list[float]:
        """``[loss · anchors, correct, anchors]`` over this worker's held-out clips in batches
        of ``batch_size`` clips, ``valid_pairs`` times over, two unaugmented windows per clip each
        time, drawn with a fixed seed (the same pairs every epoch); a last batch of fewer than 2
        clips is left out (no negative)."""
        batch = self.cfg.batch_size
        loss_sum, correct, anchors = 0.0, 0.0, 0.0
        for bank in clips.banks():
            gen = torch.Generator(device=bank.frames.device).manual_seed(self.cfg.seed + 7_919)
            for start in [s for _ in range(self.valid_pairs) for s in range(0, len(bank), batch)]:
                idx = torch.arange(start, min(len(bank), start + batch), device=bank.frames.device)
                if len(idx) < 2:
                    continue
                x1 = bank.random_windows(idx, n_frames=self.cfg.window_frames, generator=gen)
                x2 = bank.random_windows(idx, n_frames=self.cfg.window_frames, generator=gen)
                z1, z2 = self._views(model, x1, x2)
                loss, hits = info_nce(z1, z2, temperature=self.temperature)
                loss_sum += float(loss) * 2 * len(idx)
                correct += float(hits)
                anchors += 2 * len(idx)
        return [loss_sum, correct, anchors]

    def summary(self, sums: list[float]) -> dict[str, float]:
        loss_sum, correct, anchors = sums
        if not anchors:
            return {"valid_loss": float("nan"), "valid_top1": float("nan")}
        return {"valid_loss": loss_sum / anchors, "valid_top1": correct / anchors}


def make_objective(cfg, config: dict, *, device: torch.device, autocast: Callable[[], Any]):
    """The loop config's objective: ``config["objective"]`` None = :class:`Regression`, a dict
    with ``kind: contrastive`` = :class:`Contrastive`."""
    spec = config.get("objective")
    if spec is None:
        return Regression(cfg, config, device=device, autocast=autocast)
    if spec.get("kind") == "contrastive":
        return Contrastive(cfg, spec, device=device, autocast=autocast)
    raise ValueError(f"unknown training objective {spec!r}")

