"""The base of every typed config: unknown keys are errors, field docstrings become descriptions,
and each config round-trips through YAML so the resolved config can be saved beside every output."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict


class StrictConfig(BaseModel):
    """Base of every config: unknown keys are errors, field docstrings become descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def save_yaml(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())
        return path

    @classmethod
    def from_yaml(cls, path: str | Path) -> StrictConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls.model_validate(data)
