"""`GRPOTrainer`: GRPO (`grpo`) as a transformers Trainer, so the RL stage checkpoints, resumes,
runs under DeepSpeed / torchrun and reports to MLflow exactly as pretraining and SFT do.

Each batch of the Trainer's data loader is a set of prompt indices. At the first update of every
`inner_steps` the trainer samples the group answers of the batch's prompts with the policy's own
decoder and scores them; each update then minimises the clipped, KL-regularised loss on that
rollout. Rollout seeds are a function of (stage seed, optimizer step, micro-batch, process), so a
resumed run samples what the uninterrupted one would have.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..config.rl import RLConfig
from ..generation.options import SamplerConfig, TokenIds, trained_block_size
from ..generation.schedules import NoiseSchedule
from ..models.backbone import unwrap
from ..training.trainer import StageTrainer, call_as_forward
from .grpo import Rollout, estimate_logp, grpo_loss, rollout

ROLLOUT_METRICS = ("reward", "answer_tokens", "flat_groups")
"""Logged per rollout (means over the logging window): reward, answer length, share of groups
whose answers all scored the same (no advantage)."""
UPDATE_METRICS = ("kl", "ratio", "clip_fraction")
"""Logged per update."""


def index_collator(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """A batch of the RL stage's dataset: the prompt indices."""
    return {"index": torch.tensor([f["index"] for f in features], dtype=torch.long)}


class GRPOTrainer(StageTrainer):
    """GRPO on the prompts `prompts[i]` with `reward(i, answer token ids)`; `kinds[i]` names the
    question kind of prompt i (reward curves per kind, `reward_<kind>`). `reference` is the frozen
    SFT model of the KL term, on the policy's device."""

    def __init__(self, *args: Any, reference: torch.nn.Module, prompts: Sequence[list[int]],
                 reward: Callable[[int, list[int]], float], kinds: Sequence[str], rl_config: RLConfig,
                 token_ids: TokenIds, sampler: SamplerConfig, schedule: NoiseSchedule, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.reference = reference.to(self.args.device).eval().requires_grad_(False)
        self.prompts, self.reward, self.kinds = list(prompts), reward, list(kinds)
        self.rl, self.token_ids, self.sampler, self.schedule = rl_config, token_ids, sampler, schedule
        self.block_size = trained_block_size(self.model)
        self.model_accepts_loss_kwargs = False  # the Trainer divides the loss by the accumulation steps
        self._rollout: Rollout | None = None
        self._micro_batch = (-1, 0)
        self._window: dict[str, list[float]] = defaultdict(list)
        self.session_answer_tokens = 0  # trained answer tokens of this session's rollouts, this process

    def _rollout_seed(self) -> int:
        step, micro = self._micro_batch
        micro = micro + 1 if step == self.state.global_step else 0
        self._micro_batch = (self.state.global_step, micro)
        return ((self.rl.seed * 100_003 + self.state.global_step) * 64 + micro) * 1024 + self.args.process_index

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        k = self.state.global_step % self.rl.inner_steps
        if k == 0 or self._rollout is None:
            indices = inputs["index"].tolist()
            group = self.rl.group_size

            def score(i: int, answer: list[int]) -> float:
                return self.reward(indices[i], answer)

            self._rollout = rollout(unwrap(model), self.reference,
                                    [self.prompts[i] for i in indices], score, self.rl, self.token_ids, self.sampler,
                                    self._rollout_seed(), self.schedule)
            self._record_rollout(self._rollout, [self.kinds[i] for i in indices for _ in range(group)])
        batch = self._rollout
        device = self.args.device

        def objective() -> tuple[torch.Tensor, dict[str, float]]:
            logp = estimate_logp(model, batch.rows, self.rl, self.token_ids, batch.seeds[k], self.schedule,
                                 self.block_size)
            old = logp.detach() if k == 0 else batch.old_logp[k - 1].to(device)
            loss, parts = grpo_loss(logp, old, batch.ref_logp[k].to(device), batch.advantages.to(device),
                                    batch.tokens.to(device), self.rl)
            return loss.float(), parts

        loss, parts = call_as_forward(model, objective)
        for key in UPDATE_METRICS:
            self._window[key].append(parts[key])
        return (loss, None) if return_outputs else loss

    def _record_rollout(self, batch: Rollout, kinds: list[str]) -> None:
        self.session_answer_tokens += int(batch.tokens.sum())
        flat = batch.rewards.view(-1, self.rl.group_size)
        self._window["reward"].append(float(batch.rewards.mean()))
        self._window["answer_tokens"].append(batch.answer_tokens)
        self._window["flat_groups"].append(float((flat.std(1) == 0).double().mean()))
        for kind in sorted(set(kinds)):
            rewards = [float(r) for r, k in zip(batch.rewards, kinds) if k == kind]
            self._window[f"reward_{kind}"].append(sum(rewards) / len(rewards))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._window:
            means = {key: sum(values) / len(values) for key, values in self._window.items()}
            if self.args.world_size > 1:  # the shared curves are averaged over the processes (per kind: this one's)
                keys = [*ROLLOUT_METRICS, *UPDATE_METRICS]
                totals = torch.tensor([means[k] for k in keys], dtype=torch.float64, device=self.args.device)
                means.update(zip(keys, self.accelerator.reduce(totals, reduction="mean").cpu().tolist()))
            logs.update({key: round(value, 6) for key, value in means.items()})
            self._window.clear()
        super().log(logs, start_time)
