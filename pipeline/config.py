"""Configuration: one frozen dataclass tree, loaded from TOML and validated.

The defaults live in ``configs/default.toml`` (shipped inside the package as
``pipeline/data/default.toml``). A user file overrides any subset of keys. Unknown keys, wrong
types and out-of-range values raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the key."""


def _rng(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False):
    """Field metadata: allowed numeric range (inclusive unless ``lo_open``)."""
    return field(metadata={"range": (lo, hi, lo_open)})


@dataclass(frozen=True)
class Resources:
    nprocs: int = _rng(1, 512)
    omp_nthreads: int = _rng(1, 512)
    mem_gb: float = _rng(0.1, 4096)


@dataclass(frozen=True)
class Inputs:
    b0_threshold_s_mm2: float = _rng(0, 500)
    trace_b_value_s_mm2: float = _rng(0, 10000, lo_open=True)
    adc_unit: Literal["auto", "mm2_s", "1e-3mm2_s", "um2_s"] = field()
    adc_plausible_min_um2_s: float = _rng(0, 5000)
    adc_plausible_max_um2_s: float = _rng(0, 10000, lo_open=True)
    shell_tolerance: float = _rng(0, 0.5)
    adc_max_um2_s: float = _rng(0, 100000, lo_open=True)


@dataclass(frozen=True)
class Preprocessing:
    n4_shrink_factor: int = _rng(1, 16)
    n4_iterations: tuple[int, ...] = field()
    n4_convergence: float = _rng(0, 1, lo_open=True)
    n4_spline_distance_mm: float = _rng(1, 1000)
    brain_mask_closing_mm: float = _rng(0, 50)
    brain_mask_erosion_mm: float = _rng(0, 50)
    brain_mask_smoothing_mm: float = _rng(0, 20)
    brain_mask_threshold: Literal["otsu", "li", "triangle", "huang"] = field()
    dwi_bias_correct: bool = field()


@dataclass(frozen=True)
class Registration:
    metric: Literal["mattes", "correlation"] = field()
    histogram_bins: int = _rng(8, 256)
    sampling_fraction: float = _rng(0, 1, lo_open=True)
    sampling_strategy: Literal["regular", "random"] = field()
    dwi_sampling_strategy: Literal["regular", "random"] = field()
    dwi_symmetric: bool = field()
    shrink_factors: tuple[int, ...] = field()
    smoothing_sigmas_mm: tuple[float, ...] = field()
    working_spacing_mm: float = _rng(0, 20)
    finest_spacing_mm: float = _rng(0, 20)
    fine_image_smoothing_mm: float = _rng(0, 10)
    iterations: int = _rng(1, 10000)
    learning_rate: float = _rng(0, 100, lo_open=True)
    min_step: float = _rng(0, 1, lo_open=True)
    coarse_min_step: float = _rng(0, 1)
    optimizer: Literal["regular_step", "conjugate_gradient"] = field()
    max_samples: int = _rng(100, 10_000_000)
    min_samples: int = _rng(0, 10_000_000)
    initialisation: Literal["moments", "geometry", "identity"] = field()
    multistart_deg: float = _rng(0, 90)
    multistart_iterations: int = _rng(1, 10000)
    symmetric: bool = field()
    to_first_symmetric: bool = field()
    backward_learning_rate: float = _rng(0, 100)
    moving_mask_in_metric: bool = field()
    seed: int = _rng(0, 2**31 - 1)
    template_spacing_mm: float = _rng(0.25, 10)
    subject_space_margin_mm: float = _rng(0, 100)
    dwi_to_flair: Literal["rigid", "affine"] = field()
    template_iterations: int = _rng(0, 10)
    output_spacing_mm: float = _rng(0.25, 5)
    max_rotation_deg: float = _rng(0, 180, lo_open=True)
    max_translation_mm: float = _rng(0, 500, lo_open=True)


@dataclass(frozen=True)
class Segmentation:
    flair_z_seed: float = _rng(0, 50, lo_open=True)
    flair_z_grow: float = _rng(0, 50, lo_open=True)
    flair_gm_z_seed: float = _rng(-50, 50)
    flair_gm_z_grow: float = _rng(-50, 50)
    flair_edge_fraction: float = _rng(0, 1)
    flair_edge_percentile: float = _rng(0, 100)
    csf_rim_mm: float = _rng(0, 20)
    flair_rim_z_grow: float = _rng(0, None, lo_open=True)
    flair_change_sd: float = _rng(0, None, lo_open=True)
    flair_change_smooth_mm: float = _rng(0, 20)
    flair_edge_level_all_sessions: bool = field()
    flair_edge_level_floor: float = _rng(0, 1)
    flair_fov_edge_no_seed_mm: float = _rng(0, 200)
    flair_fov_edge_min_slice_mm: float = _rng(0, 50, lo_open=True)
    flair_fov_edge_ends: Literal["inferior", "both"] = field()
    dwi_hyperintense_ratio: float = _rng(0, 100, lo_open=True)
    min_lesion_volume_mm3: float = _rng(0, 1e6)
    cortex_rim_mm: float = _rng(0, 20)
    csf_adc_min_um2_s: float = _rng(0, 10000, lo_open=True)
    reference_csf_adc_min_um2_s: float = _rng(0, 10000, lo_open=True)
    csf_flair_max_ratio: float = _rng(0, 1)
    reference_csf_margin_mm: float = _rng(0, 50)
    reference_depth_mm: float = _rng(0, 50)
    nawm_flair_z_max: float = _rng(-20, 20)
    nawm_adc_trim_sd: float = _rng(0, 20, lo_open=True)


@dataclass(frozen=True)
class Tracking:
    connectivity: Literal[6, 18, 26] = field()
    min_overlap_voxels: int = _rng(1, 1e6)
    shift_tolerance_voxels: int = _rng(0, 5)
    enlarging_relative: float = _rng(0, 10)
    enlarging_absolute_ml: float = _rng(0, 1000)
    fragment_ratio: float = _rng(0, 1)


@dataclass(frozen=True)
class Dynamics:
    nawm_erosion_mm: float = _rng(0, 20)
    nawm_min_volume_ml: float = _rng(0, 1000)
    nawm_lesion_margin_mm: float = _rng(0, 50)
    restricted_below: float = _rng(0, 2, lo_open=True)
    elevated_above: float = _rng(0, 5, lo_open=True)
    restricted_edge_dwi_voxels: float = _rng(0, 10)
    restricted_edge_ring_mm: float = _rng(0, 50, lo_open=True)
    restricted_core_sd: float = _rng(0, 20)
    radc_core_depth_mm: float = _rng(0, 50)
    shine_through_in_flair_lesion: bool = field()


@dataclass(frozen=True)
class Config:
    resources: Resources
    inputs: Inputs
    preprocessing: Preprocessing
    registration: Registration
    segmentation: Segmentation
    tracking: Tracking
    dynamics: Dynamics

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), e.g. for JSON sidecars and reports."""
        return _to_plain(dataclasses.asdict(self))

    def replace(self, section: str, **values: Any) -> Config:
        """A copy with some keys of one section changed (validated like a file)."""
        data = self.to_dict()
        data[section].update(values)
        return _build(Config, data, "")


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _check_scalar(value: Any, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is Literal:
        choices = typing.get_args(typ)
        if value not in choices or isinstance(value, bool):
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(choices)}")
        return value
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {typ!r} for {key}")  # programming error


def _check_value(value: Any, typ: Any, key: str, meta: dict) -> Any:
    if typing.get_origin(typ) is tuple:
        (item_type, _) = typing.get_args(typ)
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"config key '{key}': expected a non-empty list, got {value!r}")
        return tuple(_check_value(v, item_type, f"{key}[{i}]", meta) for i, v in enumerate(value))
    value = _check_scalar(value, typ, key)
    lo, hi, lo_open = meta.get("range", (None, None, False))
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ConfigError(f"config key '{key}': {value!r} is below the allowed minimum {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"config key '{key}': {value!r} is above the allowed maximum {hi}")
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix or 'top level'}' must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"section [{prefix}]" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key '{(prefix + '.') if prefix else ''}{unknown[0]}' in {where}; "
            f"allowed keys: {', '.join(sorted(fields))}"
        )
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in data:
            raise ConfigError(f"config key '{key}' is missing")
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            values[name] = _build(typ, data[name], key)
        else:
            values[name] = _check_value(data[name], typ, key, dict(f.metadata))
    obj = cls(**values)
    _check_relations(obj, prefix)
    return obj


def _check_relations(obj: Any, prefix: str) -> None:
    """Cross-key rules that a single range cannot express."""
    if isinstance(obj, Registration) and len(obj.shrink_factors) != len(obj.smoothing_sigmas_mm):
        raise ConfigError(
            f"config keys '{prefix}.shrink_factors' and '{prefix}.smoothing_sigmas_mm' "
            "must have the same length"
        )
    if isinstance(obj, Segmentation) and obj.flair_z_grow > obj.flair_z_seed:
        raise ConfigError(f"config key '{prefix}.flair_z_grow' must not exceed flair_z_seed")
    if isinstance(obj, Segmentation) and obj.flair_gm_z_grow > obj.flair_gm_z_seed:
        raise ConfigError(f"config key '{prefix}.flair_gm_z_grow' must not exceed flair_gm_z_seed")
    if isinstance(obj, Dynamics) and obj.elevated_above <= obj.restricted_below:
        raise ConfigError(f"config key '{prefix}.elevated_above' must exceed restricted_below")
    if isinstance(obj, Inputs) and obj.adc_plausible_max_um2_s <= obj.adc_plausible_min_um2_s:
        raise ConfigError(
            f"config key '{prefix}.adc_plausible_max_um2_s' must exceed adc_plausible_min_um2_s"
        )


def _merge(base: dict, override: dict, prefix: str = "") -> dict:
    out = dict(base)
    for key, value in override.items():
        name = f"{prefix}.{key}" if prefix else key
        if key not in base:
            raise ConfigError(
                f"unknown config key '{name}'; allowed keys here: {', '.join(sorted(base))}"
            )
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{name}' must be a table like [{name}]")
            out[key] = _merge(base[key], value, name)
        else:
            out[key] = value
    return out


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def default_config_path() -> Path:
    """Path of the shipped default configuration."""
    return Path(str(resources.files("pipeline") / "data" / "default.toml"))


def load_config(path: str | Path | None = None) -> Config:
    """Load the defaults, overlay the TOML file at ``path`` (if any) and validate.

    Raises
    ------
    ConfigError
        On a missing or malformed file, an unknown key, a wrong type or an out-of-range value.
    """
    data = _read_toml(default_config_path())
    if path is not None:
        try:
            data = _merge(data, _read_toml(Path(path)))
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    try:
        return _build(Config, data, "")
    except ConfigError as exc:
        where = path if path is not None else default_config_path()
        raise ConfigError(f"{where}: {exc}") from None
