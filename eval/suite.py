"""The eval suite on one saved model folder: `run_eval(model_dir, out_dir, cfg) -> metrics`.

What runs (EvalConfig.tasks): `ppl` (ELBO perplexity bounds: held-out text; for SFT models also
answers given prompts), `dgpt_skills` (lm-eval generate_until, exact match per skill and overall,
per strategy, plus the steps sweep), `dgpt_chitchat_mc` (lm-eval multiple choice),
`dgpt_heldout_text` (lm-eval loglikelihood_rolling), `repetition` (strategy comparison on plain
and/or chat prompts), `editing` (SFT models: repair of swapped and inserted answer tokens) and any
standard lm-eval task (needs the Hub; checked before anything runs). When the run's data has the
synthetic world (a `world` source), `storage` (cloze probes of every person) runs for every model
kind, `dgpt_world` (questions and biography requests, lm-eval generate_until, per strategy, plus
the steps sweep) for SFT models, and the repetition study generates biographies of held-out people,
each scored for facts (eval/world.py).
Everything is seeded: the same settings give the same numbers.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import torch

from dgpt_core.config.evaluation import DEFAULTS_METHOD, EvalConfig
from dgpt_core.generation.options import trained_block_size
from dgpt_core.generation.sampler import SamplerConfig, TokenIds
from dgpt_core.generation.schedules import get_schedule
from dgpt_core.models.info import ModelInfo, model_info_of
from dgpt_core.provenance import commit_label, library_versions

from . import benchmarks as bm
from . import data as evdata
from . import world as evworld
from .answers import answers_frame, read_wide_tables, sample_rows, write_answers
from .editing import editing_metrics
from .ppl import answer_rows, ppl_bound, text_rows
from .report import write_outputs
from .strategy_comparison import compare_strategies

log = logging.getLogger(__name__)


def model_kind(info: ModelInfo | None, cfg: EvalConfig) -> str:
    """cfg.model_kind unless auto; else the kind the model folder records (sft when it records none)."""
    if cfg.model_kind != "auto":
        return cfg.model_kind
    return info.kind if info is not None else "sft"


def load_model(model_dir: str | Path):
    """(model in eval mode, tokenizer) from a saved model folder."""
    from transformers import ModernBertForMaskedLM

    from dgpt_core.models.tokenizer import load_tokenizer

    model = ModernBertForMaskedLM.from_pretrained(str(model_dir))
    model.eval()
    return model, load_tokenizer(str(model_dir))


def _cap(n: int, limit: int | None) -> int:
    return n if limit is None else min(n, limit)


class _Suite:
    def __init__(self, model_dir: str | Path, out_dir: str | Path, cfg: EvalConfig, model=None, tokenizer=None):
        self.cfg, self.model_dir, self.out_dir = cfg, Path(model_dir), Path(out_dir)
        self.notes: list[str] = []
        self.model, self.tok = (model, tokenizer) if model is not None else load_model(model_dir)
        self.ids = TokenIds.from_tokenizer(self.tok)
        self.info = model_info_of(self.model)
        self.kind = model_kind(self.info, cfg)
        self.max_len = int(self.model.config.max_position_embeddings)
        self.data_cfg, self.data_source = evdata.data_config_for(model_dir)
        if cfg.schedule != "auto":
            name = cfg.schedule
        else:
            name = self.info.schedule if self.info else "linear"
            if self.info is None:
                self.notes.append("the model folder records no training schedule: the bound uses linear")
        self.schedule = get_schedule(name, cfg.t_eps)
        self.trained_canvas = self.info.answer_canvas if self.info and self.kind == "sft" else None
        """The SFT answer canvas the model was trained on: the skills canvas unless cfg sets one."""
        self.long_canvas = cfg.long_canvas(self.info.trained_long_canvas if self.info else None)
        """Canvas of long answers (biography requests)."""
        self.block_size = trained_block_size(self.model)
        """The block size of a block-causal model (None: a full-canvas model)."""
        self.long_blocks = functools.partial(min, cfg.long_windows(self.block_size))
        """steps -> canvas_blocks of long answers (`EvalConfig.long_windows`, at most one per step)."""
        self.samples: dict[str, Any] = {}
        """Generations of the repetition study kept for the report."""
        self.answer_rows: list[dict[str, Any]] = []
        """Per question and decoding setting of every generative task (`eval.answers`)."""
        self.world = evworld.world_config(self.data_cfg)
        """The run's world settings when its data has the world source, else None."""
        self.runs_world = cfg.wants("dgpt_world") and self.world is not None and self.kind == "sft"
        for task in ("storage", "dgpt_world"):
            if cfg.wants(task) and self.world is None:
                self.notes.append(f"{task}: the run's data has no world source, skipped")
        if cfg.wants("dgpt_world") and self.world is not None and self.kind != "sft":
            self.notes.append(f"dgpt_world: SFT models only, skipped for a {self.kind} model")

    # ------------------------------------------------------------------------------------------

    def ppl(self) -> dict[str, Any]:
        cfg = self.cfg
        n = _cap(cfg.ppl_max_sequences, cfg.limit)
        common = {"mask_id": self.ids.mask, "pad_id": self.ids.pad, "schedule": self.schedule,
                  "t_points": cfg.ppl_t_points, "mask_draws": cfg.ppl_mask_draws, "seed": cfg.seed,
                  "batch_size": cfg.batch_size}
        seqs, desc = evdata.pretrain_sequences(cfg, self.data_cfg, self.tok, self.max_len, n)
        result = ppl_bound(self.model, text_rows(seqs), dataset=desc, **common)
        if self.kind == "sft":
            examples, desc = evdata.sft_examples(cfg, self.data_cfg, self.tok, self.max_len, n)
            if examples:
                rows, counts = answer_rows(examples, self.ids.im_end)
                result["conditional"] = ppl_bound(self.model, rows, norm_tokens=counts, dataset=desc, **common)
            else:
                self.notes.append("no held-out SFT examples: conditional bound skipped")
        return result

    def adapter(self, strategy: str, steps: int, skills_canvas: bool = True, canvas: int | None = None,
                canvas_blocks: int | None = None):
        """The lm-eval adapter. Its canvas: `canvas`, else cfg.skills_canvas (when `skills_canvas`),
        else the trained SFT canvas, else each task's max_gen_toks; `canvas_blocks` windows (None:
        the folder's default)."""
        from .lm_adapter import DiffusionLM

        cfg = self.cfg
        canvas = canvas or (cfg.skills_canvas if skills_canvas else None) or self.trained_canvas
        if strategy == DEFAULTS_METHOD:
            canvas = canvas_blocks = None  # the adapter takes the folder's own
        return DiffusionLM(
            model=self.model, tokenizer=self.tok, strategy=strategy, steps=steps, threshold=cfg.threshold,
            block_size=cfg.block_size, canvas_blocks=canvas_blocks,
            temperature=cfg.temperature, seed=cfg.seed, canvas=canvas,
            max_canvas=cfg.standard_canvas,
            mc_num=cfg.mc_num, greedy_check=cfg.greedy_check, t_points=cfg.ppl_t_points,
            mask_draws=cfg.ppl_mask_draws, schedule=self.schedule.name, t_eps=self.schedule.eps,
            batch_size=cfg.batch_size,
        )

    def task_data(self) -> dict[str, str]:
        cfg = self.cfg
        folder = Path(cfg.cache_dir) if cfg.cache_dir else self.out_dir / "task_data"
        kwargs: dict[str, Any] = {}
        if cfg.wants("dgpt_skills"):
            items, source = evdata.skills_items(cfg, self.data_cfg)
            self.skills_present = sorted({i.skill for i in items})
            kwargs["skills"] = evdata.skills_task_rows(items, self.tok, self.kind)
            self.notes.append(f"skills: {len(items)} items from {source}")
        if cfg.wants("dgpt_chitchat_mc"):
            kwargs["chitchat"] = evdata.chitchat_task_rows(
                evdata.chitchat_mc_items(self.data_cfg, cfg), self.tok, self.kind)
        if cfg.wants("dgpt_heldout_text"):
            docs, _ = evdata.heldout_documents(self.data_cfg)
            n = _cap(cfg.ppl_max_sequences, cfg.limit)
            kwargs["texts"] = list(evdata._interleave(docs))[:n]
        if self.runs_world:
            kwargs["world"] = evworld.task_rows(self.world, self.tok, self.kind, cfg.seed)
            self.world_tasks = evworld.tasks_of(kwargs["world"])
            self.notes.append(f"dgpt_world: {len(kwargs['world'])} items of {self.world.people} people")
        return bm.write_task_data(folder, **kwargs)

    def generation_stats(self, lms: list, steps: int) -> dict[str, float]:
        """Steps, forward passes per sampler call, seconds and stop rate over the adapters' calls."""
        total = {k: sum(lm.stats[k] for lm in lms) for k in ("batches", "nfe", "seconds", "stopped", "requests")}
        return {"steps": float(steps), "nfe": total["nfe"] / max(1.0, total["batches"]), "seconds": total["seconds"],
                "stop_rate": total["stopped"] / max(1.0, total["requests"])}

    def sweep(self, first: dict[str, float], key: str, run) -> dict[str, list[float]]:
        """`key` and NFE at cfg.steps (`first`) and every steps_grid value (`run(steps)` -> row)."""
        points = {self.cfg.steps: first}
        for steps in self.cfg.steps_grid:
            if steps not in points:
                points[steps] = run(steps)
        ordered = sorted(points.items())
        return {"steps": [float(s) for s, _ in ordered], "nfe": [p["nfe"] for _, p in ordered],
                "exact_match": [p[key] for _, p in ordered]}

    def run_tasks(self, group: str, lm, tasks: list[str], tm, strategy: str, steps: int) -> dict[str, Any]:
        """lm-eval's flattened results of `tasks`; their per-question rows join `answer_rows`."""
        results = bm.run_tasks(lm, tasks, tm, limit=self.cfg.limit, seed=self.cfg.seed)
        self.answer_rows += sample_rows(group, results.get("samples", {}), strategy, steps)
        return bm.flatten(results)

    def skills(self, tm, strategy: str, steps: int) -> dict[str, float]:
        lm = self.adapter(strategy, steps)
        row = bm.skills_summary(self.run_tasks("dgpt_skills", lm, bm.skills_tasks(self.skills_present), tm,
                                               strategy, steps))
        row.update(self.generation_stats([lm], steps))
        return row

    def world_row(self, tm, tasks: list[str], strategy: str, steps: int) -> dict[str, float]:
        """The dgpt_world row of one strategy: questions on the trained canvas, biography requests
        on the long-answer canvas (a biography does not fit a short-answer canvas)."""
        flat: dict[str, dict[str, float]] = {}
        lms = []
        for group, canvas, blocks in ((evworld.short_answer_tasks(tasks), None, None),
                                      (evworld.long_answer_tasks(tasks), self.long_canvas, self.long_blocks(steps))):
            if group:
                lm = self.adapter(strategy, steps, skills_canvas=False, canvas=canvas, canvas_blocks=blocks)
                flat.update(self.run_tasks("dgpt_world", lm, group, tm, strategy, steps))
                lms.append(lm)
        row = evworld.summary(flat)
        row.update(self.generation_stats(lms, steps))
        return row

    def world_benchmarks(self, tm) -> dict[str, Any]:
        """dgpt_world per strategy at cfg.steps, and the steps sweep on held-out questions."""
        cfg, per_strategy, sweep = self.cfg, {}, {}
        if not self.world_tasks:
            self.notes.append("dgpt_world: the world has no test items, skipped")
            return {}
        for strategy in cfg.strategies:
            row = per_strategy[strategy] = self.world_row(tm, self.world_tasks, strategy, cfg.steps)
            if cfg.steps_grid and "heldout" in row:
                sweep[strategy] = self.sweep(row, "heldout", lambda s, st=strategy: self.world_row(
                    tm, [evworld.TASKS["heldout"]], st, s))
        return {"dgpt_world": per_strategy, **({"dgpt_world_steps": sweep} if sweep else {})}

    def storage(self) -> dict[str, Any]:
        out, rows = evworld.storage(self.model, self.tok, self.world, batch_size=self.cfg.batch_size,
                                    seed=self.cfg.seed)
        self.answer_rows += rows
        return out

    def benchmarks(self, tm) -> dict[str, Any]:
        cfg, out = self.cfg, {}
        if cfg.wants("dgpt_skills"):
            per_strategy, sweep = {}, {}
            for strategy in cfg.strategies:
                row = per_strategy[strategy] = self.skills(tm, strategy, cfg.steps)
                if cfg.steps_grid:
                    sweep[strategy] = self.sweep(row, "exact_match", lambda s, st=strategy: self.skills(tm, st, s))
            out["dgpt_skills"] = per_strategy
            if sweep:
                out["dgpt_skills_steps"] = sweep
        if self.runs_world:
            out.update(self.world_benchmarks(tm))
        likelihood_tasks = [t for t in (bm.CHITCHAT_TASK, bm.TEXT_TASK) if cfg.wants(t)]
        if likelihood_tasks:  # no generation: one run, whatever the strategy
            lm = self.adapter(cfg.strategies[0], cfg.steps)
            flat = bm.flatten(bm.run_tasks(lm, likelihood_tasks, tm, limit=cfg.limit, seed=cfg.seed))
            out.update({k: v for k, v in flat.items() if k in likelihood_tasks})
        if cfg.standard_tasks():
            out.update(self.standard())
        return out

    def standard(self) -> dict[str, Any]:
        cfg, tm = self.cfg, bm.standard_task_manager()
        names = cfg.standard_tasks()
        first = self.adapter(cfg.strategies[0], cfg.steps)
        res = bm.run_tasks(first, names, tm, limit=cfg.limit, seed=cfg.seed, apply_chat_template=self.kind == "sft")
        flat, types = bm.flatten(res), bm.output_types(res)
        gen = [t for t in names if types.get(t) == "generate_until"]
        out: dict[str, Any] = {t: m for t, m in flat.items() if t not in gen}
        for t in gen:
            out[t] = {cfg.strategies[0]: flat.get(t, {})}
        for strategy in cfg.strategies[1:]:
            if gen:
                more = bm.flatten(bm.run_tasks(self.adapter(strategy, cfg.steps), gen, tm, limit=cfg.limit,
                                               seed=cfg.seed, apply_chat_template=self.kind == "sft"))
                for t in gen:
                    out[t][strategy] = more.get(t, {})
        return out

    def repetition(self) -> dict[str, dict[str, dict[str, float]]]:
        cfg = self.cfg
        n = _cap(cfg.repetition_prompts, cfg.limit)
        base = SamplerConfig(steps=cfg.steps, threshold=cfg.threshold, block_size=cfg.block_size,
                             temperature=cfg.repetition_token_temperature, seed=cfg.seed)
        # prompts, sampler options (canvas, windows), scorer
        modes: dict[str, tuple[list[list[int]], dict[str, int], Any]] = {}
        if self.world is not None:  # biographies of held-out people, scored for facts
            if self.kind == "sft":
                limit = self.max_len - min(self.long_canvas, self.max_len // 2)
                prompts, people = evworld.chat_prompts(self.world, self.tok, n, limit)
                modes["chat"] = (prompts, {"max_new_tokens": self.long_canvas,
                                           "canvas_blocks": self.long_blocks(cfg.steps)}, evworld.fact_scorer(people))
            prompts, people = evworld.plain_prompts(self.world, self.tok, n)
            modes["plain"] = (prompts, {"max_new_tokens": cfg.plain_canvas}, evworld.fact_scorer(people))
        else:
            if self.kind == "sft":
                limit = self.max_len - min(cfg.chat_canvas, self.max_len // 2)
                modes["chat"] = (evdata.chat_prompts(self.data_cfg, self.tok, n, limit),
                                 {"max_new_tokens": cfg.chat_canvas}, None)
            modes["plain"] = (evdata.plain_prompts(cfg, self.data_cfg, self.tok, n), {"max_new_tokens": cfg.plain_canvas},
                              None)
        by_mode, samples = {}, {}
        for mode, (prompts, options, score) in modes.items():
            if not prompts:
                self.notes.append(f"repetition: no {mode} prompts")
                continue
            by_mode[mode], samples[mode] = compare_strategies(
                self.model, self.tok, prompts, cfg.strategies, base.replace(**options),
                batch_size=cfg.batch_size, keep_samples=cfg.samples_in_report, score=score)
        self.samples.update({f"{mode} generation": s for mode, s in samples.items()})
        return by_mode

    def editing(self) -> dict[str, Any] | None:
        """The editing metric on held-out SFT answers; None (with a note) for other models or no data."""
        from dgpt_core.models.tokenizer import non_special_token_ids, special_token_ids

        cfg = self.cfg
        if self.kind != "sft":
            self.notes.append(f"editing: SFT models only, skipped for a {self.kind} model")
            return None
        examples, desc = evdata.sft_examples(cfg, self.data_cfg, self.tok, self.max_len, cfg.edit_examples)
        if not examples:
            self.notes.append("no held-out SFT examples: editing metric skipped")
            return None
        result = editing_metrics(
            self.model, examples, mask_id=self.ids.mask, delete_id=special_token_ids(self.tok)["delete"],
            pad_id=self.ids.pad, im_end_id=self.ids.im_end, replacement_ids=non_special_token_ids(self.tok),
            swap_prob=cfg.edit_swap_prob, insert_prob=cfg.edit_insert_prob, seed=cfg.seed,
            batch_size=cfg.batch_size, max_len=self.max_len)
        return {**result, "dataset": desc}


def run_eval(
    model_dir: str | Path,
    out_dir: str | Path,
    cfg: EvalConfig | None = None,
    *,
    model: torch.nn.Module | None = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Evaluate a saved model folder; write metrics.json, samples.json, report.md and plots into
    out_dir; return the metrics dict (keys ppl_bound, benchmarks, repetition, repetition_by_mode,
    editing for SFT models, storage when the data has the world source, meta). `model`/`tokenizer`
    skip loading from the folder (tests, in-process pipelines)."""
    cfg = cfg or EvalConfig()
    t0 = time.perf_counter()
    bm.check_standard_tasks(cfg.standard_tasks())  # fail fast, before loading anything
    suite = _Suite(model_dir, out_dir, cfg, model, tokenizer)
    metrics: dict[str, Any] = {"ppl_bound": {}, "benchmarks": {}, "repetition": {}, "repetition_by_mode": {}}
    timings: dict[str, float] = {"load": time.perf_counter() - t0}
    if cfg.wants("ppl"):
        start = time.perf_counter()
        metrics["ppl_bound"] = suite.ppl()
        timings["ppl"] = time.perf_counter() - start
    if cfg.wants("storage") and suite.world is not None:
        start = time.perf_counter()
        metrics["storage"] = suite.storage()
        timings["storage"] = time.perf_counter() - start
    if (any(cfg.wants(t) for t in ("dgpt_skills", bm.CHITCHAT_TASK, bm.TEXT_TASK)) or suite.runs_world
            or cfg.standard_tasks()):
        start = time.perf_counter()
        tm = bm.local_task_manager(suite.task_data())
        metrics["benchmarks"] = suite.benchmarks(tm)
        timings["benchmarks"] = time.perf_counter() - start
    primary = "chat" if suite.kind == "sft" else "plain"
    if cfg.wants("repetition"):
        start = time.perf_counter()
        metrics["repetition_by_mode"] = suite.repetition()
        metrics["repetition"] = metrics["repetition_by_mode"].get(primary, {})
        timings["repetition"] = time.perf_counter() - start
    if cfg.wants("editing"):
        start = time.perf_counter()
        editing = suite.editing()
        if editing is not None:
            metrics["editing"] = editing
        timings["editing"] = time.perf_counter() - start
    metrics["meta"] = {
        "model": {"path": str(Path(model_dir).resolve()), "kind": suite.kind, "max_seq_len": suite.max_len,
                  "vocab_size": len(suite.tok), "parameters": sum(p.numel() for p in suite.model.parameters())},
        "commit": commit_label(),
        "settings": cfg.model_dump(mode="json"),
        "seed": cfg.seed,
        "schedule": suite.schedule.name,
        "data_config": suite.data_source,
        "repetition_mode": primary,
        "versions": library_versions(),
        "notes": suite.notes,
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "wall_time_s": round(time.perf_counter() - t0, 2),
    }
    answers = answers_frame(suite.answer_rows)
    write_answers(out_dir, answers, cfg.steps)
    write_outputs(out_dir, metrics, suite.samples, read_wide_tables(out_dir), plots=cfg.plots)
    return metrics
