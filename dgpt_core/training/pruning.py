"""Optuna pruning of a training stage on its validation curve.

The sweep (flows layer) owns the Optuna study; a trial's training stage may run in another process
(torchrun, deepspeed), so the stage learns which trial it reports to from the environment
(`pruning_env`), like the MLflow run it logs into. Every val_elbo the stage computes is reported
at its step; when the study's pruner says so, the stage raises `TrialPrunedError`.
"""

from __future__ import annotations

import os

from transformers import TrainerCallback

ENV_STORAGE, ENV_STUDY, ENV_TRIAL, ENV_SIGN = ("DGPT_OPTUNA_STORAGE", "DGPT_OPTUNA_STUDY", "DGPT_OPTUNA_TRIAL",
                                               "DGPT_OPTUNA_SIGN")


STARTUP_SETTINGS = 2
"""Settings that run to the end before the pruner compares curves (with fewer the median is noise)."""


def sweep_pruner():
    """The pruner of every sweep: a setting stops when its curve is worse than the median of the
    earlier ones at the same step. Optuna does not store the pruner with the study, so the sweep
    and each training process build it here."""
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=STARTUP_SETTINGS)


class TrialPrunedError(RuntimeError):
    """The sweep's pruner stopped this training stage (its validation curve was not promising)."""


def pruning_env(storage: str, study: str, trial_number: int, maximize: bool) -> dict[str, str]:
    """The environment that makes a training stage report to trial `trial_number` of `study`.
    val_elbo is minimised; for a maximised objective it is reported negated, so that the pruner
    compares it the study's way."""
    return {ENV_STORAGE: storage, ENV_STUDY: study, ENV_TRIAL: str(trial_number), ENV_SIGN: "-1" if maximize else "1"}


class OptunaPruningCallback(TrainerCallback):
    """Reports each logged val_elbo to the Optuna trial and raises TrialPrunedError when pruned."""

    def __init__(self, storage: str, study: str, trial_number: int, sign: float = 1.0):
        import optuna

        self.study = optuna.load_study(study_name=study, storage=storage, pruner=sweep_pruner())
        trial_id = next(t._trial_id for t in self.study.get_trials(deepcopy=False) if t.number == trial_number)
        self.trial = optuna.trial.Trial(self.study, trial_id)
        self.sign = sign

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "val_elbo" not in logs or not state.is_world_process_zero:
            return
        self.trial.report(self.sign * float(logs["val_elbo"]), state.global_step)
        if self.trial.should_prune():
            self.trial.set_user_attr("pruned_at_step", state.global_step)
            raise TrialPrunedError(f"pruned at step {state.global_step}: val_elbo {logs['val_elbo']:.4f} is worse "
                                   "than the median of earlier trials at this step")


def pruning_callbacks() -> list[TrainerCallback]:
    """The pruning callback when this process trains a sweep trial's pruned stage, else none."""
    if ENV_STUDY not in os.environ:
        return []
    return [OptunaPruningCallback(os.environ[ENV_STORAGE], os.environ[ENV_STUDY], int(os.environ[ENV_TRIAL]),
                                  float(os.environ.get(ENV_SIGN, "1")))]
