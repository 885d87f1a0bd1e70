"""Training: one stage (pretraining or SFT) as a function (`train_stage`), the HF Trainer with the
diffusion loss, the torchrun / DeepSpeed launch of a stage on several processes and nodes, the
Optuna pruning hook, and the shipped DeepSpeed ZeRO configs (`deepspeed/`)."""

from .. import lazy_exports

_EXPORTS = {
    "TRAINING_STAGES": "stage", "StageResult": "stage", "train_stage": "stage",
    "DiffusionTrainer": "trainer", "NonFiniteLossError": "trainer", "training_arguments": "trainer",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
