"""The evaluation report: one self-contained HTML file (inline CSS, figures as inline base64
PNGs drawn with matplotlib's Agg renderer, no external URL), so it can be mailed, attached to a
ticket or served from object storage as is.

Input layout
------------
``metrics`` is the content of the evaluate stage's ``metrics.json``::

    {
      "cold_start": {                      # one entry per method, in display order
        "random":      {"map500": float, "auc": float, "ndcg10": float, "recall50": float,
                        "n_users": int, "n_skipped": int},     # counts optional
        "cnn_mse":     {...},
        "upper_bound": {...},              # WMF factors folded in from the test songs' plays
      },
      "source": {                          # source-task metrics per model
        "cnn_mse": {"valid_nmse": float, "tag_auc": float, ...}, ...
      },
      "tag_prediction": {                  # the tag source task: A′ = U′Vᵀ on the test songs
        "methods": {"cnn_tags": {"auc": float, "map": float, "valid_nmse": float}, ...},
        "test_songs": int, "tags": int,    # or {"skipped": reason}
      },
      "transfer": {                        # per target data set, per feature set
        "gtzan": {"kmeans": <nested_cv_svm_accuracy result>, "cnn_mse": {...}},
        "mtat":  {"cnn_mse": <mtat_tag_auc result {"top50": <tag_auc result>, "all": ...}>
                  or a single <tag_auc result>},
      },
      "run": {"run_id": str, ...},         # optional: shown as a key/value table
    }

Any section may be missing or empty; it is then replaced by a one-line note. Metric names of
``cold_start`` are free (``f"map{k}"``, ``f"ndcg{k}"``, ``f"recall{k}"`` and ``auc`` get their
usual labels); ``n_users`` and ``n_skipped`` are counts, shown in the table but not charted.
Transfer results are recognised by their keys: ``mean``/``std`` (accuracy, with ``confusion`` and
``classes`` for the heatmap) and ``auc_mean`` (tag AUC).

``figures_data`` holds what the plots need beyond the numbers::

    {
      "embedding_map": {"points": (n, d) array of test-song embeddings or predicted factors,
                        "labels": (n,) genre / top tag per song,
                        "method": str, what the points are (shown in the caption)},
      "neighbors": [{"query": "Artist – Title",
                     "wmf": ["Artist – Title", ...],        # neighbours by WMF factors
                     "predicted": ["Artist – Title", ...]}, ...],  # by predicted factors
      "training_curves": {model: {"epoch": [...], "train_loss": [...], "valid_nmse": [...]}},
    }

Every figure is an ``<img alt=…>`` inside a ``<figure>`` with a ``<figcaption>``. A small inline
script records, once the page has loaded, how many images decoded (``<body
data-images-loaded=N data-images=M>``), so a headless browser can check the page renders.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["render_report"]

_COUNT_KEYS = ("n_users", "n_skipped", "n_candidates")
_BASE = "#4c72b0"  # every method
_UPPER = "#dd8452"  # the upper bound
_MAX_MAP_POINTS = 2000  # t-SNE is O(n log n) per iteration: a seeded sample keeps it to seconds
_MAX_LABELS = 12  # colours in the map; rarer labels are drawn grey as "other"

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.7em; text-align: right; }
th { background: #f4f4f4; } td.name, th.name { text-align: left; }
tr.upper td { background: #fdf0e6; } td.best { font-weight: bold; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; margin-top: 0.3em; }
p.note { color: #777; font-style: italic; }
div.nn { display: inline-block; vertical-align: top; margin: 0 1.5em 1em 0; }
"""

# Counts how many images decoded once everything has loaded (a render check for headless browsers).
_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = document.getElementsByTagName("img"), ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; } }
  document.body.setAttribute("data-images-loaded", String(ok));
  document.body.setAttribute("data-images", String(imgs.length));
});
"""


# -- small helpers ----------------------------------------------------------------------------

def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _metric_label(name: str) -> str:
    from deepcontent.evaluate.metrics import metric_label

    return metric_label(name)


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return f"{int(x):,}"
    if _is_number(x):
        x = float(x)
        if math.isnan(x):
            return "—"
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return _e(x)


def _png(fig) -> str:
    buf = io.BytesIO()
    # no "Software" tag: the same inputs give byte-identical PNGs
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _new_figure(width: float, height: float):
    # Figure + Agg canvas directly, not pyplot: no global state, no display backend to pick
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _figure(fig, *, alt: str, caption: str) -> str:
    return (f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{_png(fig)}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>\n{body}\n</section>'


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _method_label(method: str, upper_bound: str) -> str:
    if method == upper_bound and "upper" not in method.lower():
        return f"{method} (upper bound)"
    return method


# -- cold start -------------------------------------------------------------------------------

def _cold_start(results, upper_bound: str, cutoffs=None) -> str:
    title = "Cold-start recommendation (test songs)"
    if not isinstance(results, Mapping) or not results:
        return _section(title, _note("No cold-start results in this run."), "cold-start")
    methods = list(results)
    metric_names: list[str] = []
    for m in methods:
        for k, v in (results[m] or {}).items():
            if k not in _COUNT_KEYS and _is_number(v) and k not in metric_names:
                metric_names.append(k)
    counts = [k for k in _COUNT_KEYS if any(k in (results[m] or {}) for m in methods)]

    def value(m, k):
        v = (results[m] or {}).get(k)
        return float(v) if _is_number(v) else float("nan")

    # best per column among the real methods (the upper bound is a reference, not a contender)
    best = {}
    for k in metric_names:
        vals = [(value(m, k), m) for m in methods if m != upper_bound and not math.isnan(value(m, k))]
        if vals:
            best[k] = max(vals)[1]
    head = "".join(f"<th>{_e(_metric_label(k))}</th>" for k in metric_names + counts)
    rows = []
    for m in methods:
        cls = ' class="upper"' if m == upper_bound else ""
        name = _e(_method_label(m, upper_bound))
        cells = "".join(
            ('<td class="best">' if best.get(k) == m else "<td>") + f"{_fmt((results[m] or {}).get(k))}</td>"
            for k in metric_names + counts
        )
        rows.append(f'<tr{cls}><td class="name">{name}</td>{cells}</tr>')
    table = f'<table><tr><th class="name">method</th>{head}</tr>{"".join(rows)}</table>'
    body = [table, "<p>Bold: the best method per metric, the upper bound aside.</p>"]
    full = [k for k in metric_names if k.endswith("_full")]
    if full:
        n = next((results[m].get("n_candidates") for m in methods if _is_number((results[m] or {}).get("n_candidates"))),
                 None)
        cut = (cutoffs or {}) if isinstance(cutoffs, Mapping) else {}
        asked = ", ".join(f"{_metric_label(k)}: k={cut[k]['k']}" for k in full if isinstance(cut.get(k), Mapping))
        body.append(f"<p>{_e(', '.join(_metric_label(k) for k in full))}: the cut-off k"
                    f"{' (' + _e(asked) + ')' if asked else ''} is at least the number of candidate items"
                    f"{' (' + _fmt(n) + ')' if n is not None else ''}, so these are metrics of the full ranked "
                    "list, not top-k metrics comparable with a larger catalog's.</p>")
    if metric_names:
        n = len(metric_names)
        cols = min(n, 2)
        nrows = math.ceil(n / cols)
        fig = _new_figure(6.0 * cols, 0.45 * len(methods) * nrows + 1.2 * nrows)
        for i, k in enumerate(metric_names):
            ax = fig.add_subplot(nrows, cols, i + 1)
            vals = [value(m, k) for m in methods]
            y = np.arange(len(methods))[::-1]
            colours = [_UPPER if m == upper_bound else _BASE for m in methods]
            bars = ax.barh(y, np.nan_to_num(vals), color=colours)
            for b, m in zip(bars, methods):
                if m == upper_bound:
                    b.set_hatch("//")
                    b.set_edgecolor("#8a4b1f")
            ax.set_yticks(y, [_method_label(m, upper_bound) for m in methods])
            ax.set_title(_metric_label(k))
            top = max([v for v in vals if not math.isnan(v)] or [1.0])
            ax.set_xlim(0, top * 1.25 if top > 0 else 1.0)
            for yy, v in zip(y, vals):
                ax.text(0 if math.isnan(v) else v, yy, " " + ("n/a" if math.isnan(v) else f"{v:.3g}"),
                        va="center", fontsize=8)
            ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        alt = "Bar charts of " + ", ".join(_metric_label(k) for k in metric_names) + " per method"
        caption = (f"Cold-start metrics per method, users × test songs. Orange, hatched: the upper bound "
                   f"({_e(upper_bound)}: factors folded in from the test songs' own plays).")
        body.append(_figure(fig, alt=alt, caption=caption))
    return _section(title, "\n".join(body), "cold-start")


def _seeds(section) -> str:
    """Mean ± sd per method and metric over repeated runs, and the orderings that hold."""
    title = "Repeated runs (mean ± sd over seeds)"
    if not isinstance(section, Mapping) or not section.get("cold_start"):
        return _section(title, _note("One run: set evaluate.seeds (deepcontent evaluate --seeds 3) for error bars."),
                        "seeds")
    summary = section["cold_start"]
    metric_names = [k for k, v in next(iter(summary.values())).items() if isinstance(v, Mapping)]
    head = "".join(f"<th>{_e(_metric_label(k))}</th>" for k in metric_names)
    rows = []
    for m, r in summary.items():
        cells = "".join(f"<td>{_fmt(r[k]['mean'])} ± {_fmt(r[k]['sd'])}</td>" if isinstance(r.get(k), Mapping)
                        else "<td>n/a</td>" for k in metric_names)
        rows.append(f'<tr><td class="name">{_e(m)}</td>{cells}</tr>')
    body = [f'<table><tr><th class="name">method</th>{head}</tr>{"".join(rows)}</table>',
            f"<p>Seeds {_e(', '.join(str(x) for x in section.get('seeds', [])))}. {_e(section.get('protocol', ''))}.</p>"]
    for k, pairs in (section.get("orderings") or {}).items():
        text = ", ".join(f"{a} > {b}" for a, b in pairs) or "none: every pair's intervals overlap"
        body.append(f"<p><b>{_e(_metric_label(k))}</b> orderings that hold: {_e(text)}.</p>")
    diffs = section.get("differences") or {}
    if diffs.get("methods"):
        ref, n = diffs["reference"], len(section.get("seeds", []))
        rows = []
        for m, r in diffs["methods"].items():
            cells = "".join(f"<td>{r[k]['mean']:+.4f} ± {r[k]['sd']:.4f} ({r[k]['wins']}/{n})</td>"
                            if isinstance(r.get(k), Mapping) else "<td>n/a</td>" for k in metric_names)
            rows.append(f'<tr><td class="name">{_e(m)} − {_e(ref)}</td>{cells}</tr>')
        body.append(f"<p>Paired differences to {_e(ref)}, seed by seed: mean ± sd (seeds where the method is "
                    f"above {_e(ref)}).</p>")
        body.append(f'<table><tr><th class="name">difference</th>{head}</tr>{"".join(rows)}</table>')
    return _section(title, "\n".join(body), "seeds")


# -- embedding map ----------------------------------------------------------------------------

def _project_2d(points: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    n, d = points.shape
    if d == 1:
        return np.column_stack([points[:, 0], np.zeros(n)]), "the single dimension"
    if d == 2:
        return points, "the two dimensions as they are"
    if n < 10:
        from sklearn.decomposition import PCA

        return PCA(n_components=2).fit_transform(points), "PCA (too few songs for t-SNE)"
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))  # t-SNE needs perplexity < n
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)
    return xy, f"t-SNE (perplexity {perplexity:.3g})"


def _embedding_map(data, seed: int) -> str:
    title = "Map of the test songs"
    if not isinstance(data, Mapping) or data.get("points") is None:
        return _section(title, _note("No embeddings were given for the map."), "map")
    points = np.asarray(data["points"], dtype=np.float64)
    labels = np.asarray([str(x) for x in data.get("labels", [""] * len(points))])
    if points.ndim != 2 or len(labels) != len(points):
        raise ValueError(
            f"embedding_map: points must be (n, d) with n labels, got {points.shape} and {len(labels)} labels"
        )
    keep = np.isfinite(points).all(axis=1)
    points, labels = points[keep], labels[keep]
    if len(points) < 3:
        return _section(title, _note(f"Only {len(points)} songs with finite embeddings: no map."), "map")
    sampled = ""
    if len(points) > _MAX_MAP_POINTS:
        idx = np.sort(np.random.default_rng(seed).choice(len(points), _MAX_MAP_POINTS, replace=False))
        sampled = f" A seeded sample of {_MAX_MAP_POINTS:,} of the {len(points):,} songs."
        points, labels = points[idx], labels[idx]
    xy, how = _project_2d(points, seed)
    names, counts = np.unique(labels, return_counts=True)
    order = names[np.argsort(-counts, kind="stable")]
    shown = list(order[:_MAX_LABELS]) if len(order) > _MAX_LABELS else list(order)
    fig = _new_figure(8.0, 6.5)
    ax = fig.add_subplot(1, 1, 1)
    import matplotlib

    cmap = matplotlib.colormaps["tab20" if len(shown) > 10 else "tab10"]
    other = ~np.isin(labels, shown)
    if other.any():
        ax.scatter(xy[other, 0], xy[other, 1], s=10, c="#bbbbbb", label="other", alpha=0.6)
    for i, name in enumerate(shown):
        sel = labels == name
        ax.scatter(xy[sel, 0], xy[sel, 1], s=14, color=cmap(i % cmap.N), label=name, alpha=0.85)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    method = data.get("method", "embeddings")
    caption = (f"Test songs' {_e(method)} in 2-D by {_e(how)}, coloured by genre / top tag; songs of one "
               f"colour should gather where the embedding captures what listeners hear.{sampled}")
    return _section(title, _figure(fig, alt=f"2-D map of {len(points)} test songs coloured by label",
                                   caption=caption), "map")


# -- nearest neighbours -----------------------------------------------------------------------

def _neighbors(data) -> str:
    title = "Nearest neighbours"
    if not data:
        return _section(title, _note("No query tracks were given."), "neighbors")
    blocks = []
    for q in data:
        wmf, pred = list(q.get("wmf", [])), list(q.get("predicted", []))
        n = max(len(wmf), len(pred))
        rows = "".join(
            f"<tr><td>{i + 1}</td><td class=\"name\">{_e(wmf[i]) if i < len(wmf) else ''}</td>"
            f"<td class=\"name\">{_e(pred[i]) if i < len(pred) else ''}</td></tr>"
            for i in range(n)
        )
        blocks.append(
            f'<div class="nn"><table><tr><th colspan="3" class="name">{_e(q.get("query", "?"))}</th></tr>'
            f'<tr><th>#</th><th class="name">WMF factors</th><th class="name">predicted factors</th></tr>'
            f"{rows}</table></div>"
        )
    intro = ("<p>For each query track, its nearest tracks by cosine similarity of the factors learned from "
             "listening data (WMF) and of the factors predicted from audio alone.</p>")
    return _section(title, intro + "".join(blocks), "neighbors")


# -- training curves --------------------------------------------------------------------------

def _curve_scale(curves: list[np.ndarray]) -> str:
    """``"log"`` when positive curves sharing a panel span more than 20× (losses of different
    kinds: MSE ~1, WPE ~hundreds), so none is flattened at the bottom; else ``"linear"``."""
    y = np.concatenate([np.asarray(c, dtype=np.float64) for c in curves]) if curves else np.zeros(0)
    y = y[np.isfinite(y)]
    return "log" if len(y) and y.min() > 0 and y.max() / y.min() > 20 else "linear"


def _training_curves(data) -> str:
    title = "Training curves"
    if not isinstance(data, Mapping) or not data:
        return _section(title, _note("No training history was given."), "training")
    fig = _new_figure(12.0, 4.2)
    panels = [("train_loss", "train loss"), ("valid_nmse", "validation NMSE")]
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        drawn, finite = 0, []
        for model, h in data.items():
            values = h.get(key) if isinstance(h, Mapping) else None
            if values is None or len(values) == 0:
                continue
            epochs = h.get("epoch", np.arange(1, len(values) + 1))
            y = np.asarray(values, dtype=np.float64)
            ax.plot(np.asarray(epochs), y, marker="o", ms=3, label=str(model))
            finite.append(y)
            drawn += 1
        ax.set_yscale(_curve_scale(finite))
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    caption = ("Per model: training loss and NMSE on the validation songs (MSE / variance of the target "
               "factors; 1 = no better than predicting the mean) by epoch.")
    return _section(title, _figure(fig, alt="Training loss and validation NMSE per epoch for each model",
                                   caption=caption), "training")


# -- source task ------------------------------------------------------------------------------

def _key_value_table(d: Mapping) -> str:
    rows = "".join(f'<tr><td class="name">{_e(k)}</td><td>{_fmt(v)}</td></tr>' for k, v in d.items()
                   if _is_number(v) or isinstance(v, str) or v is None)
    return f"<table>{rows}</table>"


def _source(results) -> str:
    title = "Source task"
    if not isinstance(results, Mapping) or not results:
        return _section(title, _note("No source-task results in this run."), "source")
    if all(not isinstance(v, Mapping) for v in results.values()):
        return _section(title, _key_value_table(results), "source")
    models = [m for m, v in results.items() if isinstance(v, Mapping)]
    names: list[str] = []
    for m in models:
        names += [k for k, v in results[m].items() if _is_number(v) and k not in names]
    head = "".join(f"<th>{_e(_metric_label(k))}</th>" for k in names)
    rows = "".join(
        f'<tr><td class="name">{_e(m)}</td>' + "".join(f"<td>{_fmt(results[m].get(k))}</td>" for k in names) + "</tr>"
        for m in models
    )
    return _section(title, f'<table><tr><th class="name">model</th>{head}</tr>{rows}</table>'
                    "<p>NMSE: mean squared error of the predicted factors on the validation songs divided by "
                    "the variance of the targets.</p>", "source")


# -- tag prediction (source task) -------------------------------------------------------------

def _tag_prediction(results) -> str:
    """Per regressor of tag factors: per-tag AUC and mAP of A′ = U′Vᵀ on the test songs, bars + table."""
    title = "Tag prediction (source task)"
    methods = results.get("methods") if isinstance(results, Mapping) else None
    if not isinstance(methods, Mapping) or not methods:
        reason = results.get("skipped") if isinstance(results, Mapping) else None
        return _section(title, _note(f"No tag-prediction results in this run{': ' + reason if reason else ''}."),
                        "tags")
    names = [m for m, r in methods.items() if isinstance(r, Mapping)]
    rows = "".join(
        f'<tr><td class="name">{_e(m)}</td><td>{_fmt(methods[m].get("auc"))}</td><td>{_fmt(methods[m].get("map"))}</td>'
        f'<td>{_fmt(methods[m].get("valid_nmse"))}</td></tr>' for m in names)
    fig = _new_figure(7.0, 3.2)
    for j, key in enumerate(("auc", "map")):
        ax = fig.add_subplot(1, 2, j + 1)
        values = [float(methods[m].get(key)) if _is_number(methods[m].get(key)) else 0.0 for m in names]
        ax.barh(np.arange(len(names)), values, color=["#888" if m == "upper_bound" else "#3b6ea5" for m in names])
        ax.set_yticks(np.arange(len(names)), names if j == 0 else [""] * len(names))
        ax.invert_yaxis()
        ax.set_xlabel("per-tag AUC" if key == "auc" else "per-tag mAP")
    fig.tight_layout()
    body = (f"<p>{_e(results.get('test_songs', '?'))} test songs, {_e(results.get('tags', '?'))} tags. Each regressor "
            "predicts the test songs' tag-WMF factors U′ from audio; tags are scored by A′ = U′Vᵀ and each tag ranks "
            "the test songs (AUC and average precision per tag, averaged over tags). The upper bound folds the test "
            "songs in from their own tags.</p>"
            + _figure(fig, alt="Tag prediction AUC and mAP per method",
                      caption="Tag prediction from audio: per-tag AUC and mAP on the test songs.")
            + '<table><tr><th class="name">method</th><th>AUC</th><th>mAP</th><th>valid NMSE</th></tr>'
            + rows + "</table>")
    return _section(title, body, "tags")


# -- interpretation ---------------------------------------------------------------------------

def _interpretation(results) -> str:
    """Per feature set and descriptor: the most correlated dimension and its Pearson r."""
    title = "Interpretation"
    if not isinstance(results, Mapping) or not results:
        return _section(title, _note("No descriptor correlations in this run."), "interpretation")
    rows = []
    for features, per in results.items():
        if not isinstance(per, Mapping):
            continue
        for name, r in per.items():
            if isinstance(r, Mapping):
                dim = "—" if r.get("dim") is None else str(r["dim"])
                rows.append(f'<tr><td class="name">{_e(features)}</td><td class="name">{_e(name)}</td>'
                            f"<td>{_e(dim)}</td><td>{_fmt(r.get('r'), 3)}</td></tr>")
    body = ('<table><tr><th class="name">features</th><th class="name">descriptor</th><th>dimension</th>'
            "<th>Pearson r</th></tr>" + "".join(rows) + "</table><p>For each hand-crafted descriptor of the "
            "test songs, the embedding dimension whose values correlate most with it (largest |r|).</p>")
    return _section(title, body, "interpretation")


# -- transfer ---------------------------------------------------------------------------------

#: Keys of a transfer data set's results that describe the run, not a feature set.
_TRANSFER_META = frozenset({"clips_left_out", "clips_found", "clips_used", "grouping", "protocol", "excerpts", "models",
                            "models_left_out", "skipped", "left_out_reasons", "classes"})

_PROTOCOL_WORDS = {"leave_one_group_out": "leave-one-group-out", "stratified_group_kfold": "grouped k-fold",
                   "stratified_kfold": "stratified k-fold"}


def _chosen_cs(result: Mapping) -> str:
    cs = [c for fold in result.get("chosen_C") or [] for c in (fold if isinstance(fold, list) else [fold])]
    return f"C chosen per fold: {', '.join(f'{c:g}' for c in sorted(set(cs)))}" if cs else ""


def _protocol_rows(dataset: str, features: str, result: Mapping):
    """The rows of one feature set under every protocol (transfer_protocols' result)."""
    if "mean" in result:
        folds = result.get("folds")
        label = f"accuracy (stratified {folds}-fold)" if folds else "accuracy (stratified)"
        yield (dataset, features, label, f"{_fmt(result['mean'], 3)} ± {_fmt(result.get('std'), 3)}",
               _chosen_cs(result))
    else:
        yield dataset, features, "accuracy (stratified)", "—", str(result.get("stratified_skipped", ""))
    g = result.get("grouped")
    if isinstance(g, Mapping) and "accuracy" in g:
        how = _PROTOCOL_WORDS.get(str(g.get("protocol")), str(g.get("protocol")))
        detail = f"per fold {_fmt(g.get('mean'), 3)} ± {_fmt(g.get('std'), 3)}; {_chosen_cs(g)}"
        if g.get("folds_missing_a_test_class"):
            detail += f"; {g['folds_missing_a_test_class']} folds held out a class absent from their training part"
        yield (dataset, features, f"accuracy (grouped: {how}, {g.get('folds')} folds, {g.get('groups')} groups)",
               _fmt(g["accuracy"], 3), detail)
    else:
        yield dataset, features, "accuracy (grouped)", "—", str(result.get("grouped_skipped", ""))
    nn = result.get("nearest_neighbour")
    if isinstance(nn, Mapping):
        yield (dataset, features, "1-NN accuracy (neighbour from another group)",
               _fmt(result.get("grouped_1nn_accuracy"), 3),
               f"any other clip as the neighbour: {_fmt(nn.get('any_accuracy'), 3)}")


def _transfer_rows(dataset: str, features: str, result, label: str = ""):
    if _is_number(result):
        yield dataset, features, label or "value", _fmt(result), ""
    elif isinstance(result, Mapping) and "stratified_mean" in result:
        yield from _protocol_rows(dataset, features, result)
    elif isinstance(result, Mapping) and "mean" in result:
        # one C per outer fold, or per fold one C per fused feature set
        cs = [c for fold in result.get("chosen_C") or [] for c in (fold if isinstance(fold, list) else [fold])]
        detail = f"C chosen per fold: {', '.join(f'{c:g}' for c in sorted(set(cs)))}" if cs else ""
        value = f"{_fmt(result['mean'], 3)} ± {_fmt(result.get('std'), 3)}"
        yield dataset, features, label or "accuracy", value, detail
    elif isinstance(result, Mapping) and "auc_mean" in result:
        detail = f"{result.get('n_tags_evaluated', '?')} tags, C = {result.get('chosen_C', '?')}"
        yield dataset, features, "tag AUC" + (f" ({label})" if label else ""), _fmt(result["auc_mean"], 3), detail
    elif isinstance(result, Mapping):
        for sub, r in result.items():
            yield from _transfer_rows(dataset, features, r, str(sub))


def _confusion_figure(dataset: str, features: str, result: Mapping) -> str:
    C = np.asarray(result["confusion"], dtype=np.float64)
    classes = [str(c) for c in result.get("classes", range(len(C)))]
    row_sums = C.sum(axis=1, keepdims=True)
    frac = np.divide(C, row_sums, out=np.zeros_like(C), where=row_sums > 0)
    size = max(4.5, 0.55 * len(classes) + 2.5)
    fig = _new_figure(size + 1.0, size)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(np.arange(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(np.arange(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            if C[i, j]:
                ax.text(j, i, f"{int(C[i, j])}", ha="center", va="center", fontsize=8,
                        color="white" if frac[i, j] > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    fig.tight_layout()
    caption = (f"{_e(dataset)}: confusion matrix of the linear SVM on {_e(features)} features, summed over "
               f"the outer folds (counts; colour = fraction of each true class). Accuracy "
               f"{_fmt(result.get('mean'), 3)} ± {_fmt(result.get('std'), 3)}.")
    return _figure(fig, alt=f"Confusion matrix for {dataset} with {features} features", caption=caption)


def _transfer(results) -> str:
    title = "Transfer to other tasks"
    if not isinstance(results, Mapping) or not results:
        return _section(title, _note("No transfer results in this run."), "transfer")
    rows, figures = [], []
    for dataset, by_features in results.items():
        if not isinstance(by_features, Mapping):
            rows.append((str(dataset), "", "value", _fmt(by_features), ""))
            continue
        best = None
        for features, r in by_features.items():
            if features in _TRANSFER_META:
                continue
            rows += list(_transfer_rows(str(dataset), str(features), r))
            if isinstance(r, Mapping) and "confusion" in r and _is_number(r.get("mean")):
                if best is None or r["mean"] > best[1]["mean"]:
                    best = (str(features), r)
        if best is not None:
            figures.append(_confusion_figure(str(dataset), *best))
    table = ('<table><tr><th class="name">data set</th><th class="name">features</th><th class="name">metric</th>'
             '<th>value</th><th class="name">detail</th></tr>'
             + "".join(f'<tr><td class="name">{_e(a)}</td><td class="name">{_e(b)}</td><td class="name">{_e(c)}</td>'
                       f'<td>{d}</td><td class="name">{_e(e)}</td></tr>' for a, b, c, d, e in rows)
             + "</table>")
    intro = ("<p>Linear L2-SVMs on each feature set: accuracy by nested stratified cross-validation "
             "(mean ± std over the outer folds), tag AUC averaged over tags. Where the clips have a grouping "
             "(artist, album, source), the same by a grouped protocol that never puts one group on both sides "
             "of a split (pooled accuracy over the held-out clips), and the accuracy of the nearest clip from "
             "another group: a feature that recognises the artist rather than the genre scores high under the "
             "stratified protocol and low under these.</p>")
    if not figures:
        figures.append(_note("No confusion matrix among the transfer results."))
    return _section(title, intro + table + "".join(figures), "transfer")


# -- the page ---------------------------------------------------------------------------------

def render_report(
    metrics: Mapping,
    *,
    figures_data: Mapping | None = None,
    out_path: str | os.PathLike | None = None,
    title: str = "deepcontent evaluation report",
    upper_bound: str = "upper_bound",
    seed: int = 0,
    sections: tuple[str, ...] | None = None,
) -> str:
    """Render the evaluation report as one self-contained HTML page.

    Parameters
    ----------
    metrics : mapping
        The ``metrics.json`` content; layout in the module docstring.
    figures_data : mapping or None
        Data for the map, the neighbour table and the training curves (module docstring).
    out_path : path or None
        Where to write the page (atomically: a temporary file in the same folder, then renamed);
        None: only return it.
    title : str
    upper_bound : str
        The ``cold_start`` method drawn as the upper bound.
    seed : int
        For the map's t-SNE and its sample of songs: the same inputs give the same file.
    sections : tuple of str or None
        Only these sections, in page order, among ``cold-start``, ``seeds`` (shown when the
        metrics have repeated runs), ``map``, ``neighbors``,
        ``training``, ``source``, ``tags``, ``transfer``, ``interpretation`` (None: all); the
        ``transfer`` command's report is ``("transfer",)``.

    Returns
    -------
    str
        The HTML text.
    """
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping (the metrics.json content), got {type(metrics).__name__}")
    figures_data = figures_data or {}
    run = metrics.get("run")
    builders = {
        "cold-start": lambda: _cold_start(metrics.get("cold_start"), upper_bound,
                                          (metrics.get("protocol") or {}).get("cold_start")),
        "seeds": lambda: _seeds(metrics.get("seeds")),
        "map": lambda: _embedding_map(figures_data.get("embedding_map"), seed),
        "neighbors": lambda: _neighbors(figures_data.get("neighbors")),
        "training": lambda: _training_curves(figures_data.get("training_curves")),
        "source": lambda: _source(metrics.get("source")),
        "tags": lambda: _tag_prediction(metrics.get("tag_prediction")),
        "transfer": lambda: _transfer(metrics.get("transfer")),
        "interpretation": lambda: _interpretation(metrics.get("interpretation")),
    }
    titles = {"cold-start": "cold start", "seeds": "seeds", "map": "map", "neighbors": "neighbours", "training": "training",
              "source": "source task", "tags": "tag prediction", "transfer": "transfer",
              "interpretation": "interpretation"}
    chosen = list(builders) if sections is None else list(sections)
    if sections is None and not metrics.get("seeds"):
        chosen.remove("seeds")  # one run: no section to show
    unknown = [s for s in chosen if s not in builders]
    if unknown:
        raise ValueError(f"unknown report sections {unknown}; choose from {list(builders)}")
    sections = [builders[a]() for a in chosen]
    toc = " · ".join(f'<a href="#{a}">{titles[a]}</a>' for a in chosen)
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        f"<h1>{_e(title)}</h1>\n"
        + (_key_value_table(run) if isinstance(run, Mapping) and run else "")
        + f"<nav>{toc}</nav>\n"
        + "\n".join(sections)
        + f"\n<script>{_SCRIPT}</script>\n</body></html>\n"
    )
    if out_path is not None:
        path = Path(out_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            # mkstemp makes the file owner-only; a report is meant to be shared: umask's default
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(page)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return page
