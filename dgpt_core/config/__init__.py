"""The typed configuration: one `RunConfig` tree of every stage's settings (a docstring on every
field, unknown keys rejected), its YAML presets in `presets/`, and the loading of a preset with
`--set key.path=value` overrides. Parsed once per process and passed down as an object."""

from .. import lazy_exports

_EXPORTS = {
    "StrictConfig": "base",
    "ModelConfig": "model",
    "DiffusionConfig": "diffusion",
    "LaunchedTrainingConfig": "training", "StageConfig": "training", "TrainingConfig": "training",
    "DataConfig": "data", "PretrainDataConfig": "data", "SFTDataConfig": "data", "SkillsConfig": "data",
    "SourceSpec": "data", "TokenizerConfig": "data", "WorldConfig": "data",
    "EvalConfig": "evaluation",
    "PublishConfig": "publish",
    "RLConfig": "rl",
    "SweepConfig": "sweep",
    "FOLDER_CONFIG_NAME": "run", "PRESET_DIR": "run", "RunConfig": "run", "TrackingConfig": "run",
    "add_config_arguments": "run", "available_presets": "run", "load_run_config": "run", "parse_override": "run",
    "read_folder_run_config": "run", "read_yaml": "run", "set_by_path": "run",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
