"""The codebase's shape, checked: one stage shape, domain packages that never import a stage,
every stage reachable from the CLI, `submit` and `jobs/`, and a map that names only what exists."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest

from deepcontent.stages import PIPELINE, STAGES

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "deepcontent"
DOMAIN_PACKAGES = ("audio", "interactions", "factorize", "models", "train", "embed", "evaluate", "synth", "engines")


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-local imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


@pytest.mark.parametrize("package", DOMAIN_PACKAGES)
def test_domain_packages_never_import_a_stage(package):
    offenders = {str(p.relative_to(REPO)): sorted(m for m in _imports(p) if m.startswith("deepcontent.stages"))
                 for p in (SRC / package).rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_every_stage_has_one_signature_and_is_reachable_from_cli_submit_and_jobs():
    from deepcontent.cli import COMMANDS, build_parser
    from deepcontent.stages.base import StageContext, StageResult
    from deepcontent.submit import RAY_STAGES, SPARK_STAGES

    assert set(STAGES) == {p.stem for p in (SRC / "stages").glob("*.py")} - {"__init__", "base"}
    help_text = build_parser().format_help()
    for name, stage in STAGES.items():
        fn = stage.runner()
        params = list(inspect.signature(fn).parameters.values())
        assert [p.name for p in params] == ["cfg", "ctx"], name
        hints = inspect.get_annotations(fn, eval_str=True)
        assert hints["ctx"] is StageContext and hints["return"] is StageResult, name
        assert name in COMMANDS and name in help_text, name
        assert name in (SPARK_STAGES if stage.engine == "spark" else RAY_STAGES), name
        job = REPO / "jobs" / f"{name}.py"
        assert job.is_file() and f'entry(["{name}"' in job.read_text(), name
    assert set(SPARK_STAGES) | set(RAY_STAGES) == set(STAGES)
    assert {p.stem for p in (REPO / "jobs").glob("*.py")} == set(STAGES)
    assert "submit" in help_text
    assert PIPELINE[0] == "ingest" and "nightly" not in PIPELINE


def test_the_map_names_only_what_exists():
    text = (REPO / "docs" / "architecture.md").read_text()
    paths = set(re.findall(r"`((?:src|tests|conf|jobs|infra)/[^`\s]+)`", text))
    assert len(paths) > 20
    missing = [p for p in paths if "<" not in p and not (REPO / p.rstrip("/")).exists()]
    assert not missing
    for module in set(re.findall(r"`(deepcontent(?:\.\w+)+)`", text)):
        importlib.import_module(module)
    # every stage and every dataset has its line in the map
    for name in STAGES:
        assert f"`{name}`" in text, name
    from deepcontent.datasets import DATASETS, TABLES

    for key in DATASETS:
        top, _, rest = key.partition("/")
        assert key in text or f"{top}/{{" in text, key
    for table in TABLES:
        assert f"`{table}`" in text, table


def test_no_reference_to_files_outside_the_repository():
    for path in [REPO / "README.md", *(REPO / "docs").rglob("*.md"), *SRC.rglob("*.py"), *(REPO / "infra").rglob("*")]:
        if path.is_file():
            assert "ARCHITECTURE.md" not in path.read_text(errors="replace"), path


def test_spectrogram_settings_are_declared_once():
    from deepcontent.audio.settings import MelSettings
    from deepcontent.config import SpectrogramConfig

    defaults = SpectrogramConfig()
    for f in dataclasses.fields(MelSettings):
        assert f.name in SpectrogramConfig.model_fields, f.name
        assert getattr(defaults, f.name) == f.default, f.name
    assert defaults.mel_settings() == MelSettings()
    custom = SpectrogramConfig(fmin=30.0, fmax=8000.0, n_mels=64)
    assert custom.mel_settings() == MelSettings(fmin=30.0, fmax=8000.0, n_mels=64)
    with pytest.raises(ValueError, match="fmax"):
        SpectrogramConfig(fmax=30000.0)


def test_window_in_seconds_follows_the_hop_length():
    from deepcontent.config import load_config

    cfg = load_config(None, overrides=["train.window_seconds=3.0"], environ={})
    assert cfg.train.window_frames == round(3.0 * 22050 / 512)
    cfg = load_config(None, overrides=["train.window_seconds=3.0", "spectrograms.hop_length=256"], environ={})
    assert cfg.train.window_frames == round(3.0 * 22050 / 256)
    assert load_config(None, environ={}).train.window_frames == 130  # frames as given without seconds
