"""Learning sanity on synthetic music: genre is predictable from the audio, both by the
bag-of-words baseline with linear regression and by the paper's CNN."""

from __future__ import annotations

import numpy as np
import torch

from deepcontent.models.augment import random_windows
from deepcontent.models.baselines import BagOfWords, SphericalKMeansFeatures, fit_linear
from deepcontent.models.paper_cnn import PaperCNN
from deepcontent.train.losses import mse_loss, nmse


def one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(3, dtype=np.float32)[labels]


def test_bag_of_words_linear_regression_predicts_held_out_genre(genre_clips):
    mels, labels = genre_clips
    train, test = slice(0, 42), slice(42, 60)  # labels cycle 0,1,2: both halves are balanced
    bow = BagOfWords(n_words=64, max_frames=6000, seed=0).fit(mels[train])
    model = fit_linear(bow.transform(mels[train]), one_hot(labels[train]))
    score = nmse(model.predict(bow.transform(mels[test])), one_hot(labels[test]))
    assert score < 1.0, score


def test_spherical_kmeans_features_linear_regression_predicts_held_out_genre(genre_clips):
    mels, labels = genre_clips
    train, test = slice(0, 42), slice(42, 60)
    skm = SphericalKMeansFeatures(64, max_windows=5000, seed=0).fit(mels[train])
    model = fit_linear(skm.transform(mels[train]), one_hot(labels[train]))
    score = nmse(model.predict(skm.transform(mels[test])), one_hot(labels[test]))
    assert score < 1.0, score


def test_paper_cnn_training_loss_drops_well_below_its_start(genre_clips):
    mels, labels = genre_clips
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    clips = [torch.from_numpy(m) for m in mels]
    targets = torch.from_numpy(one_hot(labels))
    model = PaperCNN(n_factors=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    fixed = random_windows(clips, n_frames=130, generator=torch.Generator().manual_seed(99)).float()

    def full_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(mse_loss(model(fixed), targets))

    initial = full_loss()
    for _ in range(6):  # epochs: a fresh random window per clip each time, minibatches of 15
        order = torch.randperm(len(clips), generator=gen)
        for s in range(0, len(clips), 15):
            idx = order[s : s + 15]
            x = random_windows([clips[i] for i in idx], n_frames=130, generator=gen)
            model.train()
            loss = mse_loss(model(x), targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    final = full_loss()
    assert final < 0.5 * initial, (initial, final)
