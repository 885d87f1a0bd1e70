"""Hyperparameter sweeps over the run config: the search space, the trials it expands to, and the
objective's direction and summary (no Prefect, MLflow or Optuna import: the flow layer runs them).

A dimension is written like a `--set` override with several values or a range:

    sft.learning_rate=1e-3,3e-4        a list (a grid axis; a categorical choice for Optuna)
    sft.learning_rate=1e-4:1e-2:log    a range for Optuna (floats; `:log` samples on a log scale)
    sft.max_steps=100:400              integer bounds give an integer range
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
import statistics
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..cli_errors import ConfigError
from .base import StrictConfig
from .run import RunConfig, parse_override


class Dimension(BaseModel):
    """One swept config key: a list of values, or (Optuna only) a numeric range."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    """The dotted config key, as in `--set`."""
    values: list[Any] | None = None
    """The values of a list dimension (parsed as YAML, like `--set` values)."""
    low: float | None = None
    """Lower bound of a range dimension."""
    high: float | None = None
    """Upper bound of a range dimension."""
    log: bool = False
    """Sample a range on a log scale."""
    integer: bool = False
    """A range of integers (both bounds written as integers)."""

    @property
    def is_range(self) -> bool:
        return self.values is None

    def spec(self) -> str:
        """The dimension written back the way it is given on the command line."""
        if self.values is not None:
            return f"{self.key}={','.join(str(v) for v in self.values)}"
        bounds = f"{int(self.low)}:{int(self.high)}" if self.integer else f"{self.low:g}:{self.high:g}"
        return f"{self.key}={bounds}{':log' if self.log else ''}"


_RANGE = re.compile(r"^\s*([^:,]+):([^:,]+)(:log)?\s*$")


def parse_dimension(text: str) -> Dimension:
    """'key=v1,v2' -> a list dimension; 'key=lo:hi[:log]' -> a range (a ConfigError otherwise)."""
    key, raw = text.split("=", 1) if "=" in text else (text, "")
    if not key.strip() or not raw.strip():
        raise ConfigError(f"sweep dimension {text!r} is not of the form key.path=v1,v2 or key.path=low:high[:log]")
    key = key.strip()
    if match := _RANGE.match(raw):
        low, high = (_number(parse_override(f"{key}={bound}")[1]) for bound in match.group(1, 2))
        if not all(isinstance(b, int | float) and not isinstance(b, bool) for b in (low, high)) or low >= high:
            raise ConfigError(f"sweep dimension {text!r}: a range needs numbers low < high")
        log = bool(match.group(3))
        if log and low <= 0:
            raise ConfigError(f"sweep dimension {text!r}: a log range needs low > 0")
        return Dimension(key=key, low=low, high=high, log=log, integer=isinstance(low, int) and isinstance(high, int))
    values = [_number(parse_override(f"{key}={item}")[1]) for item in _top_level_items(raw)]
    if len(set(map(repr, values))) != len(values):
        raise ConfigError(f"sweep dimension {text!r}: a value is listed twice")
    return Dimension(key=key, values=values)


def _top_level_items(raw: str) -> list[str]:
    """'a,[b,c],{d: 1}' -> ['a', '[b,c]', '{d: 1}']: commas inside brackets belong to a YAML value."""
    items, depth, current = [], 0, ""
    for char in raw:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    return [*items, current]


def _number(value: Any) -> Any:
    """YAML 1.1 reads `1e-3` (no dot) as a string; a swept value that reads as a number is one."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    return value


def default_sweep_name(preset: str) -> str:
    return f"sweep-{preset}-{datetime.now(UTC):%Y%m%d-%H%M%S}"


def check_keys(base: RunConfig, dimensions: Sequence[Dimension], seed_key: str) -> None:
    """Every swept key (and the seed key) names a field of the sweep's base run config, else a
    ConfigError naming it. Only the keys: a bad *value* fails just its own trials."""
    tree = base.model_dump()
    for key in [d.key for d in dimensions] + [seed_key]:
        node: Any = tree
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"sweep key {key!r} is not a config field (preset {base.preset})")
            node = node[part]
    duplicated = {d.key for d in dimensions if [e.key for e in dimensions].count(d.key) > 1}
    if duplicated or seed_key in {d.key for d in dimensions}:
        raise ConfigError(f"sweep key {sorted(duplicated or {seed_key})[0]!r} is given twice (a dimension or the seed key)")


def grid_settings(dimensions: Sequence[Dimension]) -> list[dict[str, Any]]:
    """The cartesian product of list dimensions, in the order given (the last key varies fastest)."""
    ranges = [d.spec() for d in dimensions if d.is_range]
    if ranges:
        raise ConfigError(f"a grid takes value lists, not ranges ({ranges[0]}): use --search optuna")
    return [dict(zip([d.key for d in dimensions], combo)) for combo in
            itertools.product(*(d.values for d in dimensions))]


def setting_overrides(setting: dict[str, Any]) -> list[str]:
    """A setting as `--set` overrides (values in YAML flow style, so they parse back the same)."""
    import yaml

    return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for key, value in setting.items()]


MINIMIZED = ("loss", "elbo", "ppl", "nll", "perplexity", "seconds", "nfe", "repeat")
"""Metric name parts that make lower better; any other metric is maximised."""


def metric_direction(metric: str) -> Literal["minimize", "maximize"]:
    """The direction of a metric by its name: losses, bounds and times are minimised."""
    parts = metric.lower().split("/")
    return "minimize" if any(word in part for part in parts for word in MINIMIZED) else "maximize"


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for one value); (None, None) for none."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def better(a: float, b: float | None, direction: str) -> bool:
    """`a` strictly beats `b` (anything beats a missing or NaN `b`)."""
    if b is None or math.isnan(b):
        return True
    return a < b if direction == "minimize" else a > b


class SweepConfig(StrictConfig):
    """A sweep: the base run config, the space, seeds, objective and how trials run."""

    name: str
    """The sweep's name: its folder `<output root>/sweeps/<name>`, MLflow run and Optuna study,
    and the prefix of its trials' run folders."""
    preset: str = "tiny"
    """Preset of the base run config."""
    overrides: list[str] = Field(default_factory=list)
    """`--set` overrides applied to every trial before its own values."""
    space: list[Dimension]
    """The swept dimensions."""
    seeds: list[int] = Field(default_factory=lambda: [0])
    """Seeds every setting is trained with (the metric is averaged over them)."""
    seed_key: str = "sft.seed"
    """The config key the seed goes to: by default SFT's, so the data and pretraining stages are
    shared by every trial; `seed` reseeds the whole pipeline."""
    metric: str = "train/sft/val_elbo"
    """The objective: a metric of a trial run as MLflow shows it on the trial's run
    (`train/<stage>/<name>` or `eval/<model>/...`, e.g. eval/sft/benchmarks/dgpt_world/confidence/heldout)."""
    direction: Literal["minimize", "maximize"] | None = None
    """Whether lower or higher is better (default: by the metric's name, see metric_direction)."""
    search: Literal["grid", "optuna"] = "grid"
    """Every setting of the grid, or an Optuna TPE search over the space."""
    trials: int = Field(8, gt=0)
    """Settings an Optuna search tries (a grid tries all of its settings)."""
    pruning: bool = True
    """Optuna: stop a setting's first seed early when its validation curve (val_elbo of the last
    trained stage) is worse than the median of earlier settings at the same step."""
    max_parallel: int = Field(1, gt=0)
    """Trial runs at the same time (local runs isolate each training stage in its own process)."""
    output_dir: str | None = None
    """Output root shared by the trials (default: the preset's output_dir)."""
    trial_deployment: str | None = None
    """Run each trial as a run of this deployment (e.g. `pretrain-sft/trial`) so the workers of
    its pool share them out, instead of as subflows of this process; the output root must then be
    a folder every worker and this process see at the same path."""

    @model_validator(mode="after")
    def _direction_from_metric(self) -> SweepConfig:
        if self.direction is None:
            self.direction = metric_direction(self.metric)
        if not self.space:
            raise ValueError("a sweep needs at least one dimension (--grid key=v1,v2)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} repeat a seed")
        return self

    def trial_overrides(self, setting: dict[str, Any], seed: int) -> list[str]:
        """The `--set` overrides of one trial: the base ones, then the setting's, then the seed."""
        return [*self.overrides, *setting_overrides(setting), f"{self.seed_key}={seed}"]
