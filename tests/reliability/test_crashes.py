"""kill -9 at every publish and commit point of ingest, spectrograms, factorize, embed and
neighbors, then a re-run: the outputs must equal a clean run's (every published dataset and
every warehouse table, ignoring run ids and times).

The crash points are named in the code (:func:`deepcontent.faults.crash_point`); a clean run
records the points it passes (``DEEPCONTENT_CRASH_LOG``) and the test checks that the list
below is exactly that, so a new publish or commit cannot go untested. Two cases that reproduce
reported windows run by default; the full matrix is marked slow.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from reliability.harness import cli, copy_workdir, digest, ok

# stage -> (the state it starts from, the commands that make that state from the previous one)
STAGE_STATE = {"ingest": "st0", "spectrograms": "st1", "factorize": "st2", "embed": "st3", "neighbors": "st4"}
STEPS = {"st0": ["generate"], "st1": ["ingest"], "st2": ["spectrograms", "matrices"], "st3": ["factorize", "train"],
         "st4": ["embed"]}
POINTS = {
    "ingest": [
        *(f"ingest:{w}_publish:{d}" for d in ("canonical/tracks", "canonical/plays", "canonical/tags", "quarantine/ingest")
          for w in ("before", "after")),
        # (this catalog quarantines nothing at ingest: an empty quarantine append commits nothing)
        *(f"warehouse:before_commit:{t}" for t in ("tracks", "plays", "tags")),
        *(f"ingest:after_commit:{t}" for t in ("tracks", "plays", "tags", "quarantine")),
        "ingest:before_marker",
    ],
    "spectrograms": [
        *(f"spectrograms:{w}_publish:{d}" for d in ("features/spectrograms", "features/audio_index",
                                                    "quarantine/spectrograms") for w in ("before", "after")),
        "spectrograms:before_marker",
    ],
    "factorize": [
        *(f"factorize:{w}_publish:{d}" for d in ("factors/plays/item_factors", "factors/plays/user_factors",
                                                 "factors/tags/item_factors", "factors/tags/tag_factors")
          for w in ("before", "after")),
        *(f"warehouse:before_commit:{t}" for t in ("item_factors", "user_factors")),
        *(f"factorize:after_commit:{t}" for t in ("item_factors", "user_factors")),
        "factorize:before_marker",
    ],
    "embed": ["warehouse:before_commit:embeddings", "embed:after_commit:embeddings",
              "embed:before_publish:quarantine/embed", "embed:after_publish:quarantine/embed", "embed:before_marker"],
    "neighbors": ["warehouse:before_commit:similar_tracks", "neighbors:after_commit:similar_tracks"],
}
# The windows the review reproduced: ingest killed inside the tracks upsert; spectrograms killed
# between publishing the shards and the index.
DEFAULT = {("ingest", "warehouse:before_commit:tracks"),
           ("spectrograms", "spectrograms:after_publish:features/spectrograms")}


@pytest.fixture(scope="module")
def states(tmp_path_factory):
    """``state(name)``: work directory st0..st4 (names of one length: the Iceberg metadata of a
    copy is rewritten in place), each the previous plus its STEPS, made on first use."""
    base = tmp_path_factory.mktemp("crashes")
    made: dict[str, Path] = {}
    names = list(STEPS)

    def state(name: str) -> Path:
        if name not in made:
            i = names.index(name)
            wd = copy_workdir(state(names[i - 1]), base / name) if i else base / name
            wd.mkdir(exist_ok=True)
            for step in STEPS[name]:
                ok(cli(wd, step, "--json"))
            made[name] = wd
        return made[name]

    return base, state


_counter = iter(range(1, 1000))


def _case_dir(base: Path) -> Path:
    return base / f"k{next(_counter):02d}"


@pytest.fixture(scope="module")
def clean(states):
    """stage -> (digest after a clean run, crash points that run passed)."""
    base, state = states
    cache: dict[str, tuple[dict, list[str]]] = {}

    def get(stage: str):
        if stage not in cache:
            wd = copy_workdir(state(STAGE_STATE[stage]), _case_dir(base))
            log = wd / "points.log"
            ok(cli(wd, stage, "--json", extra_env={"DEEPCONTENT_CRASH_LOG": str(log)}))
            passed = log.read_text().split() if log.exists() else []
            cache[stage] = (digest(wd), passed)
        return cache[stage]

    return get


def _cases(default: bool):
    for stage, points in POINTS.items():
        for point in points:
            if ((stage, point) in DEFAULT) == default:
                yield pytest.param(stage, point, id=f"{stage}@{point}")


def _crash_and_rerun(states, clean, stage: str, point: str) -> None:
    base, state = states
    expected, passed = clean(stage)
    assert point in passed, f"a clean {stage} run never passes {point}; it passes {passed}"
    wd = copy_workdir(state(STAGE_STATE[stage]), _case_dir(base))
    killed = cli(wd, stage, "--json", crash_at=point)
    assert killed.returncode == -9, f"{stage} was not killed at {point}: rc {killed.returncode}\n{killed.stderr[-2000:]}"
    ok(cli(wd, stage, "--json"))
    got = digest(wd)
    diff = {k: (got.get(k), expected.get(k)) for k in set(got) | set(expected) if got.get(k) != expected.get(k)}
    assert not diff, f"after a kill at {point} and a re-run, {stage}'s outputs differ from a clean run's: {diff}"


@pytest.mark.parametrize("stage,point", list(_cases(default=True)))
def test_a_rerun_after_a_kill_equals_a_clean_run(states, clean, stage, point):
    _crash_and_rerun(states, clean, stage, point)


@pytest.mark.slow
@pytest.mark.parametrize("stage,point", list(_cases(default=False)))
def test_a_rerun_after_a_kill_equals_a_clean_run_everywhere(states, clean, stage, point):
    _crash_and_rerun(states, clean, stage, point)


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(POINTS))
def test_every_crash_point_a_stage_passes_is_tested(clean, stage):
    _, passed = clean(stage)
    assert sorted(set(passed)) == sorted(set(POINTS[stage]))
