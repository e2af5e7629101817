from pathlib import Path

import pytest

from deepcontent.config import Config, ConfigError, load_config, parse_overrides

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_file_loads_into_the_typed_model(path):
    cfg = load_config(path, environ={})
    assert isinstance(cfg, Config)
    assert cfg.storage.root.startswith(("s3://", "file://"))


def test_local_is_the_embedded_default():
    cfg = load_config(None, environ={})
    assert cfg.storage.embedded_s3 is True
    assert cfg.warehouse.type == "sql" and cfg.warehouse.uri.startswith("sqlite:")
    assert cfg.spark.master.startswith("local")
    assert cfg.ray.address is None


def test_overrides_are_typed_and_win_over_files_and_environment():
    cfg = load_config(None, overrides=["synth.songs=500", "storage.embedded_s3=false", "spark.conf.spark.ui.enabled=false"],
                      environ={"DEEPCONTENT__SYNTH__SONGS": "77", "DEEPCONTENT__SYNTH__USERS": "123"})
    assert cfg.synth.songs == 500  # command line beats environment
    assert cfg.synth.users == 123  # environment beats files
    assert cfg.storage.embedded_s3 is False


def test_bad_values_name_the_field_and_value():
    with pytest.raises(ConfigError, match="songs"):
        load_config(None, overrides=["synth.songs=lots"], environ={})
    with pytest.raises(ConfigError, match="ftp://x"):
        load_config(None, overrides=["storage.root=ftp://x"], environ={})
    with pytest.raises(ConfigError, match="nonsense"):
        load_config(None, overrides=["synth.nonsense=1"], environ={})
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_overrides(["no-equals-sign"])


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", environ={})


def test_secrets_never_appear_in_dumps_or_fingerprints():
    cfg = load_config(None, overrides=["storage.access_key_id=AKIDSECRET1", "storage.secret_access_key=SUPERSECRET2"], environ={})
    for text in (repr(cfg), str(cfg.public_dict()), cfg.model_dump_json()):
        assert "SUPERSECRET2" not in text and "AKIDSECRET1" not in text
    assert cfg.storage.secret_access_key.get_secret_value() == "SUPERSECRET2"
    other = load_config(None, overrides=["storage.access_key_id=A", "storage.secret_access_key=B"], environ={})
    assert cfg.fingerprint() == other.fingerprint()  # secrets do not change what a run computes


def test_extends_chains_files(tmp_path):
    (tmp_path / "a.yaml").write_text("synth: {songs: 11, users: 22}\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nsynth: {users: 33}\n")
    cfg = load_config(tmp_path / "b.yaml", environ={})
    assert (cfg.synth.songs, cfg.synth.users) == (11, 33)


def test_train_settings_that_cannot_work_together_are_refused():
    ok = load_config(None, overrides=["train.model=raw_audio", "train.input=waveform"], environ={})
    assert ok.train.model == "raw_audio" and ok.train.input == "waveform"
    for pairs, message in (
        (["train.model=raw_audio"], "raw_audio model reads waveforms"),
        (["train.input=waveform"], "raw_audio model reads waveforms"),
        (["train.model=raw_audio", "train.input=waveform", "train.gain_db=3"], "work on log-mels"),
        (["train.loss=wpe", "train.targets=tags"], "needs train.targets=plays"),
    ):
        with pytest.raises(ValueError, match=message):
            load_config(None, overrides=pairs, environ={})
