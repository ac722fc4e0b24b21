"""HoliTomConfig validation, inner-layer resolution and the presets."""

from __future__ import annotations

import dataclasses
import json

import pytest

from holitom_cli.compression import DEFAULT_PRESET, PRESET_DESCRIPTIONS, PRESETS, HoliTomConfig, get_preset
from holitom_cli.errors import ConfigError


def test_defaults_and_dict() -> None:
    cfg = HoliTomConfig()
    expected = {
        "retain_ratio": 0.20,
        "tau": 0.80,
        "beta": 0.6,
        "dpc_k": 7,
        "max_window": 1024,
        "inner": True,
        "inner_layer": None,
        "inner_prune_ratio": 0.5,
    }
    assert cfg.to_dict() == expected
    assert json.loads(json.dumps(cfg.to_dict())) == expected


def test_keyword_only_and_frozen() -> None:
    with pytest.raises(TypeError):
        HoliTomConfig(0.1)  # type: ignore[misc]
    cfg = HoliTomConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.tau = 0.5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("retain_ratio", 0.0),
        ("retain_ratio", 1.01),
        ("retain_ratio", -0.2),
        ("retain_ratio", float("nan")),
        ("retain_ratio", "0.2"),
        ("tau", -1.5),
        ("tau", float("inf")),
        ("tau", float("nan")),
        ("beta", -0.1),
        ("beta", 1.5),
        ("dpc_k", 0),
        ("dpc_k", 2.5),
        ("dpc_k", True),
        ("max_window", 0),
        ("inner", "yes"),
        ("inner_layer", 0),
        ("inner_layer", 3.0),
        ("inner_prune_ratio", 1.0),
        ("inner_prune_ratio", -0.1),
    ],
)
def test_invalid_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        HoliTomConfig(**{field: value})
    assert field in info.value.message
    assert info.value.hint


@pytest.mark.parametrize(
    "kwargs",
    [
        {"retain_ratio": 1.0},
        {"tau": -1.0},
        {"tau": 5.0},
        {"beta": 0.0},
        {"beta": 1.0},
        {"max_window": 1},
        {"inner_prune_ratio": 0.0},
        {"inner_layer": 1},
    ],
)
def test_boundary_values_are_accepted(kwargs: dict) -> None:
    cfg = HoliTomConfig(**kwargs)
    for key, value in kwargs.items():
        assert getattr(cfg, key) == value


def test_range_is_stated_in_messages() -> None:
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        HoliTomConfig(retain_ratio=2)
    with pytest.raises(ConfigError, match=r"\[-1, \+inf\)"):
        HoliTomConfig(tau=-3)


@pytest.mark.parametrize(("layers", "expected"), [(28, 18), (80, 60), (24, 15), (2, 1), (4, 3), (1, None)])
def test_auto_inner_layer(layers: int, expected: int | None) -> None:
    assert HoliTomConfig().resolve_inner_layer(layers) == expected


def test_inner_layer_explicit_and_disabled() -> None:
    assert HoliTomConfig(inner_layer=5).resolve_inner_layer(28) == 5
    assert HoliTomConfig(inner=False, inner_layer=5).resolve_inner_layer(28) is None
    with pytest.raises(ConfigError, match="inner_layer"):
        HoliTomConfig(inner_layer=28).resolve_inner_layer(28)


def test_presets() -> None:
    assert DEFAULT_PRESET == "balanced"
    assert list(PRESETS) == ["fastest", "fast", "balanced", "accurate"]
    assert set(PRESET_DESCRIPTIONS) == set(PRESETS)
    numbers = {name: (cfg.retain_ratio, cfg.tau) for name, cfg in PRESETS.items()}
    assert numbers == {
        "fastest": (0.10, 0.65),
        "fast": (0.15, 0.80),
        "balanced": (0.20, 0.80),
        "accurate": (0.25, 0.80),
    }
    for cfg in PRESETS.values():
        assert (cfg.beta, cfg.dpc_k, cfg.inner, cfg.inner_prune_ratio, cfg.inner_layer) == (
            0.6,
            7,
            True,
            0.5,
            None,
        )
    assert get_preset("fast") is PRESETS["fast"]


def test_unknown_preset_lists_names() -> None:
    with pytest.raises(ConfigError) as info:
        get_preset("turbo")
    for name in PRESETS:
        assert name in info.value.message
    assert info.value.hint
