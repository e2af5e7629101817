"""The HTML evaluation report: self-contained, every section, and it renders in a real browser."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import scipy.sparse as sp

from deepcontent.evaluate.metrics import cold_start_metrics
from deepcontent.evaluate.report import render_report

GENRES = ["rock", "jazz", "electronic"]


def _world():
    """Metrics computed for real on a tiny synthetic catalog, so the numbers are consistent."""
    rng = np.random.default_rng(0)
    n_users, n_songs, f = 200, 60, 8
    X = rng.normal(size=(n_users, f))
    genre = np.repeat(np.arange(3), 20)
    centres = rng.normal(size=(3, f)) * 2
    Y = centres[genre] + 0.5 * rng.normal(size=(n_songs, f))  # WMF factors of the test songs
    S = X @ Y.T
    plays = sp.csr_matrix(S > np.quantile(S, 0.9, axis=1, keepdims=True)).astype(float)
    methods = {
        "random": rng.normal(size=(n_songs, f)),
        "bow_linear": Y + 3.0 * rng.normal(size=Y.shape),
        "cnn_mse": Y + 1.0 * rng.normal(size=Y.shape),
        "upper_bound": Y,
    }
    cold = {m: cold_start_metrics(X, Yp, plays, map_k=500, ndcg_k=10, recall_k=50) for m, Yp in methods.items()}
    # a 3-class confusion summed over folds: 90 clips, accuracy = trace / n = 78 / 90
    confusion = [[28, 1, 1], [3, 25, 2], [2, 3, 25]]
    metrics = {
        "run": {"run_id": "20240101-000000", "factors": f},
        "cold_start": cold,
        "source": {"bow_linear": {"valid_nmse": 0.93, "tag_auc": 0.71},
                   "cnn_mse": {"valid_nmse": 0.78, "tag_auc": 0.82}},
        "tag_prediction": {"methods": {"random": {"auc": 0.50, "map": 0.11},
                                       "cnn_tags": {"auc": 0.74, "map": 0.31, "valid_nmse": 0.81},
                                       "upper_bound": {"auc": 0.97, "map": 0.83}},
                           "test_songs": 120, "tags": 35},
        "transfer": {
            "gtzan": {
                "kmeans": {"mean": 0.80, "std": 0.05, "per_fold": [0.8] * 10, "chosen_C": [0.01] * 10,
                           "confusion": [[27, 2, 1], [4, 23, 3], [3, 5, 22]], "classes": GENRES},
                "cnn_mse": {"mean": 78 / 90, "std": 0.04, "per_fold": [78 / 90] * 10, "chosen_C": [0.1] * 10,
                            "confusion": confusion, "classes": GENRES},
                # late fusion: one C per fused feature set in each fold
                "kmeans_hpss_fusion": {"mean": 0.82, "std": 0.05, "per_fold": [0.82] * 10,
                                       "chosen_C": [[0.01, 0.1, 1.0]] * 10, "confusion": [[27, 2, 1], [3, 24, 3], [3, 4, 23]],
                                       "classes": GENRES},
            },
            "mtat": {"cnn_mse": {"top50": {"auc_mean": 0.86, "n_tags_evaluated": 50, "chosen_C": 0.01},
                                 "all": {"auc_mean": 0.81, "n_tags_evaluated": 180, "chosen_C": 0.01}}},
        },
    }
    titles = [f"Artist {i % 7} – Song {i}" for i in range(n_songs)]
    titles[0] = "<b>AC/DC</b> & \"Friends\""  # must be escaped, not interpreted
    Yn = Y / np.linalg.norm(Y, axis=1, keepdims=True)
    P = methods["cnn_mse"] / np.linalg.norm(methods["cnn_mse"], axis=1, keepdims=True)
    neighbors = []
    for q in (0, 25, 45):
        by_wmf = [titles[j] for j in np.argsort(-(Yn @ Yn[q]))[1:6]]
        by_pred = [titles[j] for j in np.argsort(-(P @ P[q]))[1:6]]
        neighbors.append({"query": titles[q], "wmf": by_wmf, "predicted": by_pred})
    figures_data = {
        "embedding_map": {"points": methods["cnn_mse"], "labels": [GENRES[g] for g in genre],
                          "method": "predicted factors (cnn_mse)"},
        "neighbors": neighbors,
        "training_curves": {
            "cnn_mse": {"epoch": list(range(1, 11)), "train_loss": list(1 / np.arange(1, 11)),
                        "valid_nmse": list(0.75 + 0.3 / np.arange(1, 11))},
            "bow_mlp": {"epoch": list(range(1, 11)), "train_loss": list(1.2 / np.arange(1, 11)),
                        "valid_nmse": list(0.9 + 0.2 / np.arange(1, 11))},
        },
    }
    return metrics, figures_data


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.figures, self.captions, self.body = [], 0, 0, {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        elif tag == "figure":
            self.figures += 1
        elif tag == "figcaption":
            self.captions += 1
        elif tag == "body":
            self.body = a


def _parse(text: str) -> _Tags:
    p = _Tags()
    p.feed(text)
    return p


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    metrics, figures_data = _world()
    out = tmp_path_factory.mktemp("report") / "sub" / "report.html"
    text = render_report(metrics, figures_data=figures_data, out_path=out)
    return out, text, metrics


def test_report_is_self_contained_with_every_figure(report):
    out, text, metrics = report
    assert out.read_text(encoding="utf-8") == text
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!data:|#)""", text)  # only inline data and anchors
    tags = _parse(text)
    # cold-start bars, map, training curves, tag-prediction bars, confusion for gtzan (mtat has none)
    assert len(tags.imgs) == tags.figures == tags.captions == 5
    for img in tags.imgs:
        assert img["src"].startswith("data:image/png;base64,iVBORw0KGgo")  # PNG signature
        assert img["alt"].strip()
    # every cold-start method and metric is in the table, the upper bound marked
    for m in metrics["cold_start"]:
        assert f">{m}" in text
    # 60 test songs: mAP@500 never cuts the list and is labelled the full-list mAP, with a note
    for label in ("mAP (full list)", "AUC", "NDCG@10", "recall@50"):
        assert label in text
    assert "mAP@500" not in text and "metrics of the full ranked list" in text
    assert '<tr class="upper"><td class="name">upper_bound</td>' in text
    # the neighbour tables: both columns, titles escaped
    assert "WMF factors" in text and "predicted factors" in text
    assert "<b>AC/DC</b>" not in text and "&lt;b&gt;AC/DC&lt;/b&gt; &amp; &quot;Friends&quot;" in text
    # transfer: accuracy with its std, the best feature set's confusion matrix, the MTAT tag AUCs
    assert "0.867 ± 0.040" in text and "Confusion matrix for gtzan with cnn_mse features" in text
    assert "tag AUC (top50)" in text and "tag AUC (all)" in text
    assert "kmeans_hpss_fusion" in text and "C chosen per fold: 0.01, 0.1, 1" in text
    # the tag source task: a row per regressor with AUC and mAP
    assert '<td class="name">cnn_tags</td><td>0.7400</td><td>0.3100</td><td>0.8100</td>' in text
    assert "120 test songs, 35 tags" in text
    assert "valid NMSE" in text


def test_report_is_deterministic(report, tmp_path):
    _, text, _ = report
    metrics, figures_data = _world()
    assert render_report(metrics, figures_data=figures_data) == text


def test_missing_sections_become_notes():
    text = render_report({"cold_start": {"random": {"map500": 0.001, "auc": 0.5, "ndcg10": 0.0, "recall50": 0.01}}})
    for note in ("No embeddings were given for the map.", "No query tracks were given.",
                 "No training history was given.", "No source-task results in this run.",
                 "No transfer results in this run.", "No descriptor correlations in this run.",
                 "No tag-prediction results in this run."):
        assert note in text
    tags = _parse(text)
    assert len(tags.imgs) == tags.figures == 1  # the bars only
    empty = render_report({})
    assert "No cold-start results in this run." in empty and "<img" not in empty
    with pytest.raises(TypeError, match=r"metrics must be a mapping .* got list"):
        render_report([])


def test_descriptor_correlations_are_tabulated():
    text = render_report({"interpretation": {"cnn_mse_penultimate": {"tempo_bpm": {"dim": 17, "r": -0.6123},
                                                                     "loudness_db": {"dim": None, "r": float("nan")}}}})
    assert "Pearson r" in text and "tempo_bpm" in text and "<td>17</td>" in text and "-0.612" in text


def test_small_maps_use_pca_and_nan_metrics_show_a_dash():
    metrics = {"cold_start": {"a": {"map500": float("nan"), "auc": 0.6}}}
    data = {"embedding_map": {"points": np.random.default_rng(0).normal(size=(6, 5)),
                              "labels": ["x", "y"] * 3, "method": "embeddings"}}
    text = render_report(metrics, figures_data=data)
    assert "PCA (too few songs for t-SNE)" in text and "<td>—</td>" in text
    assert len(_parse(text).imgs) == 2


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run_chromium(binary: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,3000",
        # lets the load handlers finish before the DOM is dumped or the screenshot taken
        "--virtual-time-budget=10000",
    ]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_renders_in_headless_chromium(report, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("chromium is not installed (`make setup` installs it where it runs as root with apt)")
    out, text, _ = report
    dom = _run_chromium(binary, tmp_path, "--dump-dom", out.resolve().as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    tags = _parse(dom.stdout)
    assert tags.figures == 5 and len(tags.imgs) == 5
    assert tags.body.get("data-images") == "5", dom.stdout[:500]
    assert tags.body.get("data-images-loaded") == "5"  # every image decoded (naturalWidth > 0)
    png = tmp_path / "report.png"
    shot = _run_chromium(binary, tmp_path, f"--screenshot={png}", out.resolve().as_uri())
    assert shot.returncode == 0, shot.stderr[-2000:]
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 50_000  # a real page, not a blank one


def test_training_losses_of_different_scales_get_a_log_axis():
    from deepcontent.evaluate.report import _curve_scale

    mse, wpe = np.array([1.0, 0.8, 0.7]), np.array([510.0, 470.0, 430.0])
    assert _curve_scale([mse, wpe]) == "log"
    assert _curve_scale([mse, mse * 1.5]) == "linear"
    assert _curve_scale([mse - 1.0, wpe]) == "linear"  # a zero or negative value: no log axis
    assert _curve_scale([np.array([np.nan, 1.0]), np.array([100.0])]) == "log"  # NaN epochs ignored
    assert _curve_scale([]) == "linear"


def test_the_seeds_section_shows_each_methods_paired_difference_to_the_reference():
    from deepcontent.evaluate.metrics import seed_differences, seed_summary

    per_seed = {0: {"cnn_mse": {"auc": 0.70}, "cnn_finetuned": {"auc": 0.72}},
                1: {"cnn_mse": {"auc": 0.60}, "cnn_finetuned": {"auc": 0.61}}}
    seeds = {"seeds": [0, 1], "cold_start": seed_summary(per_seed), "orderings": {"auc": []},
             "differences": {"reference": "cnn_mse", "methods": seed_differences(per_seed, reference="cnn_mse")}}
    text = render_report({"cold_start": {"cnn_mse": {"auc": 0.70}}, "seeds": seeds}, sections=("seeds",))
    assert "Paired differences to cnn_mse" in text
    assert re.search(r"cnn_finetuned − cnn_mse</td><td>\+0\.0150 ± 0\.0071 \(2/2\)</td>", text), text[-2000:]
