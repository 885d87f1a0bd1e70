"""The run configuration: every stage's settings in one typed tree, loaded from a preset YAML
plus `--set key.path=value` overrides, and saved resolved beside every output."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from ..cli_errors import ConfigError, NotFoundError, validation_message
from .base import StrictConfig
from .data import DataConfig, TokenizerConfig
from .diffusion import DiffusionConfig
from .evaluation import EvalConfig
from .model import ModelConfig
from .publish import PublishConfig
from .rl import RLConfig
from .training import StageConfig

PRESET_DIR = Path(__file__).parent / "presets"


class TrackingConfig(StrictConfig):
    """MLflow tracking of pipeline runs."""

    enabled: bool = True
    """Log runs, metrics, artifacts and the final model to MLflow."""
    tracking_uri: str | None = None
    """Tracking URI; MLFLOW_TRACKING_URI wins, None = a SQLite file in the output root."""
    experiment: str = "diffusiongpt"
    """Experiment holding every run of the project."""
    registered_model_name: str = "diffusiongpt"
    """Model-registry name of the final (SFT) model."""
    model_alias: str = "candidate"
    """Alias pointed at the newest registered version (MLflow reserves "latest")."""
    system_metrics: bool = True
    """Sample CPU/GPU/memory into each stage run while it runs."""
    system_metrics_interval: float = Field(5.0, gt=0)
    """Seconds between system-metric samples."""


class RunConfig(StrictConfig):
    """A whole pipeline run: data -> tokenizer -> pretrain -> SFT (-> eval -> publish)."""

    preset: str = "custom"
    """Name of the preset this config was resolved from."""
    output_dir: str = "runs"
    """Root folder of run outputs (stage folders, checkpoints, reports)."""
    seed: int = 0
    """Global seed: every seed this config does not set explicitly (data splits and skills, model
    init and data order of each stage, its collator, the eval) takes this value, so it is part of
    every stage's cache key; an explicitly set stage seed overrides it."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Data sources and the pretraining / SFT dataset builders."""
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    """Trained BPE or pretrained tokenizer."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The ModernBERT backbone."""
    pretrain: StageConfig = Field(default_factory=StageConfig)
    """Pretraining on packed plain text (every token eligible)."""
    sft: StageConfig = Field(default_factory=lambda: StageConfig(diffusion=DiffusionConfig(edit_start=0.0)))
    """Chat SFT (only the final assistant answer and its padding eligible)."""
    rl: RLConfig = Field(default_factory=RLConfig)
    """Reinforcement learning of the SFT model on verifiable rewards (GRPO; off by default)."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """The eval suite run on the pipeline's models."""
    eval_models: list[Literal["untrained", "pretrain", "sft", "sft_control", "rl"]] = Field(
        default_factory=lambda: ["untrained", "pretrain", "sft", "rl"])
    """Models the eval stage scores: the freshly initialised model (a floor), the pretrained
    model, the SFT model, `sft_control`: the same SFT started from the untrained model (trained
    by the flow's SFT stage when listed here; what SFT reaches without pretraining), and `rl`:
    the SFT model after the RL stage (when rl.enabled)."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """MLflow tracking."""
    publish: PublishConfig = Field(default_factory=PublishConfig)
    """Hugging Face Hub upload of the SFT model (a verified dry run without repo id or token)."""

    def seed_inheritance(self) -> list[tuple[StrictConfig, StrictConfig]]:
        """(section, the section whose seed it takes unless its own is set), parents first: the
        data and stage seeds follow the global seed, the skills, world and collator seeds theirs."""
        return [(self.data, self), (self.data.skills, self.data), (self.data.world, self.data), (self.pretrain, self),
                (self.pretrain.diffusion, self.pretrain), (self.sft, self), (self.sft.diffusion, self.sft),
                (self.rl, self), (self.eval, self)]

    @model_validator(mode="after")
    def _seeds_follow_the_global_seed(self) -> RunConfig:
        for section, parent in self.seed_inheritance():
            if "seed" not in section.model_fields_set:
                section.seed = parent.seed
        return self

    @model_validator(mode="after")
    def _only_sft_replays(self) -> RunConfig:
        if self.pretrain.pretrain_replay:
            raise ValueError("pretrain.pretrain_replay must be 0: replay mixes pretraining text into SFT "
                             "(set sft.pretrain_replay)")
        return self


def set_by_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """tree['a']['b'] = value for dotted 'a.b' (intermediate dicts are created)."""
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'sft.learning_rate=1e-4' -> ('sft.learning_rate', 0.0001); values are parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML: {_flat(err)}") from None


def read_yaml(path: Path) -> Any:
    """The YAML document of a config file ({} when empty); a missing file is a NotFoundError and
    one that does not parse a ConfigError, each naming the file."""
    if not path.is_file():
        raise NotFoundError(f"{path} does not exist")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_flat(err)}") from None


def _flat(err: yaml.YAMLError) -> str:
    """A YAML error (problem, position and the line's excerpt) on one line."""
    return " ".join(str(err).split())


def resolve_preset_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} and path.exists():
        return path
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise NotFoundError(f"unknown preset {name_or_path!r}: use one of {known} or a path to a YAML file")


def add_config_arguments(parser: Any) -> None:
    """--preset and repeatable --set key.path=value on an argparse (sub)parser."""
    parser.add_argument("--preset", default="tiny", help="preset name or YAML path (default: tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. sft.learning_rate=1e-4 (repeatable)")


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_run_config(name_or_path: str | Path = "tiny", overrides: list[str] | None = None) -> RunConfig:
    """A preset (name in dgpt_core/config/presets or a YAML path) with overrides applied and validated."""
    path = resolve_preset_path(name_or_path)
    tree = read_yaml(path)
    tree.setdefault("preset", path.stem)
    for item in overrides or []:
        set_by_path(tree, *parse_override(item))
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        given = "".join(f", --set {item!r}" for item in overrides or [])
        raise ConfigError(f"invalid config: {validation_message(err)} (preset {path}{given})") from None


FOLDER_CONFIG_NAME = "run_config.yaml"
"""The resolved RunConfig saved in every model folder, stage folder and run folder."""


def read_folder_run_config(folder: str | Path) -> RunConfig | None:
    """The resolved run config saved in a model (or run) folder; None when the folder has none.
    A file that no longer validates (an older or foreign config) is a ConfigError naming it."""
    path = Path(folder) / FOLDER_CONFIG_NAME
    if not path.exists():
        return None
    try:
        return RunConfig.model_validate(read_yaml(path))
    except ValidationError as err:
        raise ConfigError(f"{path}: not a valid run config: {validation_message(err)}") from None
