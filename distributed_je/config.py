"""Typed, validated configuration.

YAML in ``tune_configs/`` -> ``--set a.b=value`` overrides -> frozen dataclasses, one per
section. Unknown keys and out-of-range values fail with a message that names the key, the
value and what is allowed. At the Ray boundary a config travels as a plain dict
(``to_dict``) and each worker rebuilds it (``from_dict``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

VARIANTS = ("scvi", "thinning_only", "denoising", "je", "je_only")
LIKELIHOODS = ("nb", "zinb", "poisson")
DISPERSIONS = ("gene", "gene-batch")
JE_LATENTS = ("sample", "mean")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
MODES = ("min", "max")


class ConfigError(ValueError):
    """A configuration value or key that is not allowed; the message says what is."""


def _opt(default: Any, *, low: float | None = None, high: float | None = None,
         low_open: bool = False, choices: tuple | None = None) -> Any:
    """A config field with its allowed range (inclusive unless ``low_open``) or choices."""
    meta = {"low": low, "high": high, "low_open": low_open, "choices": choices}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


class _Section:
    """Base of every section: checks types, ranges and choices after construction."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        section = SECTION_NAMES[type(self)]
        for f in dataclasses.fields(self):
            key = f"{section}.{f.name}"
            value = _coerce(key, getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
            _check_range(key, value, f.metadata)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Return ``value`` as type ``hint`` or raise naming the key and the expected type."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{key}=None is not allowed: expected {_type_name(hint)}")
    for t in allowed:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}={value} is not allowed: expected a finite number")
            return float(value)
        if t is str and isinstance(value, str):
            return value
        if typing.get_origin(t) is dict or t is dict:
            if isinstance(value, Mapping):
                return dict(value)
        if typing.get_origin(t) is list or t is list:
            if isinstance(value, (list, tuple)):
                return list(value)
    raise ConfigError(f"{key}={value!r} has type {type(value).__name__}: expected {_type_name(hint)}")


def _type_name(hint: Any) -> str:
    if isinstance(hint, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _check_range(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}={value!r} is not allowed: choose one of {', '.join(map(str, choices))}")
    low, high = meta.get("low"), meta.get("high")
    if low is None and high is None:
        return
    below = value <= low if meta.get("low_open") else value < low if low is not None else False
    above = high is not None and value > high
    if below or above:
        left = "(" if meta.get("low_open") else "["
        raise ConfigError(f"{key}={value} is out of range: allowed {left}{low}, {high if high is not None else 'inf'}]")


@dataclass(frozen=True)
class ExperimentConfig(_Section):
    name: str = "je-scvi"
    seed: int = _opt(0, low=0)
    storage_path: str = "./dje_results"


@dataclass(frozen=True)
class DataConfig(_Section):
    store: str = ""
    batch_key: str | None = None
    labels_key: str | None = None
    batch_size: int = _opt(512, low=2)
    validation_fraction: float = _opt(0.1, low=0.0, high=0.5)
    block_rows: int = _opt(4096, low=1)
    blocks_per_buffer: int = _opt(32, low=1)
    sparse_batches: bool = True  # CSR batches: read at their non-zeros on CPU, densified on a GPU


@dataclass(frozen=True)
class ModelConfig(_Section):
    variant: str = _opt("je", choices=VARIANTS)
    n_latent: int = _opt(10, low=1, high=1024)
    n_hidden: int = _opt(128, low=1, high=65536)
    n_layers: int = _opt(1, low=1, high=16)
    dropout_rate: float = _opt(0.1, low=0.0, high=0.99)
    likelihood: str = _opt("nb", choices=LIKELIHOODS)
    dispersion: str = _opt("gene", choices=DISPERSIONS)
    encode_batch: bool = False


@dataclass(frozen=True)
class LossConfig(_Section):
    reconstruction_weight: float = _opt(1.0, low=0.0)
    kl_weight: float = _opt(1.0, low=0.0)
    kl_warmup_steps: int = _opt(2000, low=0)
    je_weight: float = _opt(100.0, low=0.0)
    lambda_off_diag: float = _opt(0.01, low=0.0)
    je_latent: str = _opt("sample", choices=JE_LATENTS)
    gather_je: bool = True


@dataclass(frozen=True)
class AugmentConfig(_Section):
    min_library_size: float = _opt(10.0, low=0.0, low_open=True)


@dataclass(frozen=True)
class OptimConfig(_Section):
    lr: float = _opt(1e-3, low=0.0, low_open=True, high=10.0)
    weight_decay: float = _opt(1e-6, low=0.0)
    eps: float = _opt(0.01, low=0.0, low_open=True)


@dataclass(frozen=True)
class TrainConfig(_Section):
    max_epochs: int = _opt(100, low=1)
    monitor_metric: str = "val_elbo"
    monitor_mode: str = _opt("min", choices=MODES)
    early_stopping_patience: int = _opt(0, low=0)
    time_budget_s: float = _opt(0.0, low=0.0)
    checkpoints_to_keep: int = _opt(2, low=1)
    max_failures: int = _opt(3, low=-1)
    max_preemption_failures: int = _opt(-1, low=-1)
    preemption_grace_s: float = _opt(0.0, low=0.0)


@dataclass(frozen=True)
class ScalingConfig(_Section):
    num_workers: int = _opt(1, low=1)
    min_workers: int = _opt(0, low=0)
    use_gpu: bool = False
    cpus_per_worker: float = _opt(1.0, low=0.0, low_open=True)
    placement_strategy: str = _opt("PACK", choices=PLACEMENT_STRATEGIES)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_workers > self.num_workers:
            raise ConfigError(f"scaling.min_workers={self.min_workers} is out of range: allowed "
                              f"[0, scaling.num_workers={self.num_workers}]")


@dataclass(frozen=True)
class TuneConfig(_Section):
    num_samples: int = _opt(8, low=1)
    max_concurrent_trials: int = _opt(2, low=1)
    metric: str | list = "val_combined_nll"
    mode: str | list = "min"
    search_space: dict = _opt({})
    points_to_evaluate: list = _opt([])
    grace_period: int = _opt(1, low=1)
    reduction_factor: float = _opt(3.0, low=1.0, low_open=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        metrics, modes = self.metrics, self.modes
        if not metrics or not all(isinstance(m, str) and m for m in metrics):
            raise ConfigError(f"tune.metric={self.metric!r} is not allowed: give a metric name or a list of them")
        if len(modes) != len(metrics):
            raise ConfigError(f"tune.mode={self.mode!r} is not allowed: give one mode per metric in {metrics}")
        for mode in modes:
            if mode not in MODES:
                raise ConfigError(f"tune.mode={mode!r} is not allowed: choose one of {', '.join(MODES)}")

    @property
    def metrics(self) -> list[str]:
        """The objectives, in order; the first one also drives the ASHA scheduler."""
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    @property
    def modes(self) -> list[str]:
        return [self.mode] if isinstance(self.mode, str) else list(self.mode)


SECTIONS: dict[str, type] = {
    "experiment": ExperimentConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "loss": LossConfig,
    "augment": AugmentConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "scaling": ScalingConfig,
    "tune": TuneConfig,
}
SECTION_NAMES = {cls: name for name, cls in SECTIONS.items()}


@dataclass(frozen=True)
class Config:
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Config:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
        _reject_unknown("section", raw, SECTIONS)
        sections = {}
        for name, section_cls in SECTIONS.items():
            values = raw.get(name) or {}
            if not isinstance(values, Mapping):
                raise ConfigError(f"{name} must be a mapping of keys, got {values!r}")
            _reject_unknown(f"key in section '{name}'", values, {f.name for f in dataclasses.fields(section_cls)})
            sections[name] = section_cls(**values)
        return cls(**sections)

    def replace(self, **dotted: Any) -> Config:
        """Return a copy with ``{"loss.kl_weight": 0.5, ...}`` applied and validated."""
        raw = self.to_dict()
        for key, value in dotted.items():
            set_dotted(raw, key, value)
        return Config.from_dict(raw)


def _reject_unknown(what: str, given: Iterable[str], valid: Iterable[str]) -> None:
    valid = list(valid)
    for key in given:
        if key not in valid:
            raise ConfigError(f"unknown {what}: '{key}'; valid: {', '.join(valid)}")


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``raw[section][name] = value`` for ``key = "section.name"``, checking both parts."""
    parts = key.split(".")
    if len(parts) != 2:
        raise ConfigError(f"override key '{key}' must have the form section.key, e.g. loss.kl_weight")
    section, name = parts
    _reject_unknown("section", [section], SECTIONS)
    _reject_unknown(f"key in section '{section}'", [name], [f.name for f in dataclasses.fields(SECTIONS[section])])
    raw.setdefault(section, {})[name] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"loss.kl_weight=0.5"`` -> ``("loss.kl_weight", 0.5)``; the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {text!r} must look like section.key=value")
    return key.strip(), yaml.safe_load(value) if value.strip() else ""


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
    return Config.from_dict(raw)
