"""Configuration: defaults load, overrides validate, errors name the key."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.config import ConfigError, default_config_path, load_config


def _write(tmp_path, text):
    path = tmp_path / "user.toml"
    path.write_text(text)
    return path


def test_defaults_load_and_are_frozen():
    cfg = load_config()
    assert cfg.registration.output_spacing_mm == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.registration.output_spacing_mm = 2.0  # type: ignore[misc]


def test_shipped_default_is_configs_default(repo):
    assert default_config_path().read_bytes() == (repo / "configs" / "default.toml").read_bytes()


def test_every_default_key_is_commented(repo):
    """Every tunable in default.toml says its unit or meaning on its line."""
    for line in (repo / "configs" / "default.toml").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            assert "#" in line, f"undocumented config line: {line!r}"


def test_override_subset(tmp_path):
    cfg = load_config(_write(tmp_path, "[registration]\noutput_spacing_mm = 2\n"))
    assert cfg.registration.output_spacing_mm == 2.0
    assert cfg.tracking == load_config().tracking


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[registration]\nspacing = 1\n", "registration.spacing"),
        ("[nonsense]\nx = 1\n", "nonsense"),
        ("[registration]\noutput_spacing_mm = 'fine'\n", "registration.output_spacing_mm"),
        ("[registration]\noutput_spacing_mm = 0.0\n", "registration.output_spacing_mm"),
        ("[tracking]\nconnectivity = 7\n", "tracking.connectivity"),
        ("[resources]\nnprocs = 1.5\n", "resources.nprocs"),
        ("[dynamics]\nrestricted_below = 1.3\n", "elevated_above"),
        ("[registration]\nshrink_factors = [4, 2]\n", "shrink_factors"),
        ("registration = 3\n", "registration"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, needle):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text))
    assert needle in str(err.value)
    assert "user.toml" in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[registration\n"))


def test_replace_validates():
    cfg = load_config()
    assert cfg.replace("resources", nprocs=4).resources.nprocs == 4
    with pytest.raises(ConfigError, match="resources.nprocs"):
        cfg.replace("resources", nprocs=0)
