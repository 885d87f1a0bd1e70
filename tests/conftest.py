import os

# Offline and quiet before transformers / datasets are imported by any test module; subprocesses
# that tests start get the same environment.
QUIET_OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_EVALUATE_OFFLINE": "1",
    "HF_UPDATE_DOWNLOAD_COUNTS": "0",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DS_ACCELERATOR": "cpu",
}
for _var, _value in QUIET_OFFLINE.items():
    os.environ.setdefault(_var, _value)

import pytest  # noqa: E402
import torch  # noqa: E402

from dgpt_core.config import ModelConfig  # noqa: E402
from dgpt_core.models.backbone import build_model  # noqa: E402
from dgpt_core.models.tokenizer import train_bpe_tokenizer  # noqa: E402

COLORS = ["red", "blue", "green", "black", "white", "brown"]
ANIMALS = ["cat", "dog", "fox", "owl", "cow", "pig"]


def structured_corpus(n: int = 400) -> list[str]:
    """Short sentences with a fixed template: a tiny model can learn the structure in seconds."""
    return [f"the {COLORS[i % 6]} {ANIMALS[(i // 6) % 6]} sat on the mat ." for i in range(n)]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_bpe_tokenizer(structured_corpus() + [f"{i} plus {i} is {2 * i}" for i in range(200)], 300)


@pytest.fixture
def tiny_model(tiny_tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_seq_len=64)
    return build_model(cfg, tiny_tokenizer)
