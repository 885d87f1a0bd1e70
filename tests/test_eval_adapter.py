"""The lm-eval adapter: lm-eval's own request types on the local tasks, until/canvas handling,
exact match 1.0 for a model that knows the answers, registry, and identical reruns."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

from dgpt_core.config import SkillsConfig
from dgpt_core.config.evaluation import EvalConfig
from dgpt_core.data.skills import generate_skills
from dgpt_core.generation.sampler import SamplerConfig
from dgpt_core.models.export import save_model_folder
from dgpt_core.models.tokenizer import special_token_ids
from eval import benchmarks as bm
from eval.data import chitchat_task_rows, skills_task_rows
from eval.lm_adapter import DiffusionLM

SKILLS_CFG = SkillsConfig(train_per_skill=0, validation_per_skill=0, test_per_skill=2)
TEXTS = ["the red cat sat on the mat .", "3 plus 3 is 6", "the brown owl sat on the mat . " * 6]


@pytest.fixture(scope="module")
def task_data(tmp_path_factory, tiny_tokenizer):
    items = generate_skills(SKILLS_CFG, "test")
    mc = [
        {"id": 1, "history": [{"role": "user", "content": "the red cat"}], "reply": "sat on the mat",
         "distractors": ["2 plus 2 is 4", "blue"], "label": 0},
        {"id": 2, "history": [{"role": "user", "content": "what is 1 plus 1"}], "reply": "2",
         "distractors": ["the dog", "green fox sat"], "label": 2},
    ]
    folder = tmp_path_factory.mktemp("task_data")
    meta = bm.write_task_data(
        folder, skills=skills_task_rows(items, tiny_tokenizer, "sft"),
        chitchat=chitchat_task_rows(mc, tiny_tokenizer, "sft"), texts=TEXTS,
    )
    return items, meta


def _lm(model, tok, **kw):
    opts = {"strategy": "confidence", "steps": 4, "mc_num": 4, "t_points": 4, "mask_draws": 1, "batch_size": 8}
    return DiffusionLM(model=model, tokenizer=tok, **{**opts, **kw})


def _instance(kind, args, idx=0):
    return Instance(request_type=kind, doc={}, arguments=args, idx=idx, metadata=("t", idx, 1))


def test_request_types_directly(tiny_model, tiny_tokenizer):
    lm = _lm(tiny_model, tiny_tokenizer)
    ll = lm.loglikelihood([_instance("loglikelihood", ("the red", " cat sat")),
                           _instance("loglikelihood", ("", "the mat")),
                           _instance("loglikelihood", ("the", ""))])
    assert all(isinstance(v, float) and isinstance(g, bool) for v, g in ll)
    assert ll[0][0] < 0 and ll[1][0] < 0 and ll[2] == (0.0, True)
    rolling = lm.loglikelihood_rolling([_instance("loglikelihood_rolling", (TEXTS[2] * 4,))])  # > max_len
    assert len(rolling) == 1 and rolling[0] < 0 and math.isfinite(rolling[0])
    gen = lm.generate_until([
        _instance("generate_until", ("the red", {"until": ["a"], "max_gen_toks": 6})),
        _instance("generate_until", ("1 plus", {"until": [], "max_gen_toks": 3}), 1),
    ])
    assert isinstance(gen[0], str) and "a" not in gen[0]
    assert lm.generations[1]["answer_tokens"] <= 3  # the canvas is the task's fixed max_gen_toks
    assert lm.stats["batches"] == 2 and lm.stats["requests"] == 2  # two groups (canvas 6 and 3)
    assert 0 < lm.stats["nfe"] <= 2 * 4
    assert lm.loglikelihood([_instance("loglikelihood", ("the red", " cat sat"))])[0] == ll[0]


def test_until_and_encode_pair(tiny_model, tiny_tokenizer):
    assert DiffusionLM.cut_until("abc<|im_end|>x\ny", ["\n", "<|im_end|>"]) == "abc"
    lm = _lm(tiny_model, tiny_tokenizer)
    ctx, cont = lm.encode_pair("the red ", "cat")
    assert ctx + cont == lm.encode("the red cat") and cont
    chat = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ctx, cont = lm.encode_pair(chat, " cat<|im_end|>")
    assert ctx == lm.encode(chat) and tiny_tokenizer.decode(cont) == " cat<|im_end|>"
    im_end = special_token_ids(tiny_tokenizer)["im_end"]
    assert im_end in lm._stops(["<|im_end|>", "\n"])


def test_local_tasks_through_lm_eval(task_data, tiny_model, tiny_tokenizer):
    _, meta = task_data
    tm = bm.local_task_manager(meta)
    tasks = ["dgpt_skills", bm.CHITCHAT_TASK, bm.TEXT_TASK]
    res = bm.run_tasks(_lm(tiny_model, tiny_tokenizer), tasks, tm, limit=2)
    flat = bm.flatten(res)
    skills = bm.skills_summary(flat)
    assert skills["n"] == 2 * len(SKILLS_CFG.skills) and 0 <= skills["exact_match"] <= 1
    assert {f"exact_match_{s}" for s in SKILLS_CFG.skills} <= set(skills)
    assert 0 <= flat[bm.CHITCHAT_TASK]["acc"] <= 1 and 0 <= flat[bm.CHITCHAT_TASK]["acc_norm"] <= 1
    assert flat[bm.TEXT_TASK]["bits_per_byte"] > 0
    assert bm.output_types(res)[bm.TEXT_TASK] == "loglikelihood_rolling"
    again = bm.flatten(bm.run_tasks(_lm(tiny_model, tiny_tokenizer), tasks, tm, limit=2))
    assert again == flat  # same settings, same numbers


class AnswerOracle(torch.nn.Module):
    """A stand-in model that knows every skills answer: for a row whose real tokens start with a
    known prompt, every canvas position gets the answer token (then <|im_end|>, then eos)."""

    def __init__(self, tokenizer, rows, max_len: int = 128):
        super().__init__()
        ids = special_token_ids(tokenizer)
        self.vocab, self.mask = len(tokenizer), ids["mask"]
        self.table = {}
        for row in rows:
            prompt = tuple(tokenizer(row["context"], add_special_tokens=False)["input_ids"])
            answer = tokenizer(" " + row["answer"], add_special_tokens=False)["input_ids"]
            self.table[prompt] = [*answer, ids["im_end"]]
        self.eos = ids["eos"]
        self.config = SimpleNamespace(max_position_embeddings=max_len, model_type="oracle")
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask, **_):
        logits = torch.full((*input_ids.shape, self.vocab), -20.0)
        for b in range(len(input_ids)):
            real = input_ids[b][attention_mask[b].bool()].tolist()
            start = int((attention_mask[b] == 0).sum())
            for cut in range(len(real), 0, -1):
                answer = self.table.get(tuple(real[:cut]))
                if answer is not None:
                    for k in range(input_ids.shape[1] - start - cut):
                        logits[b, start + cut + k, answer[k] if k < len(answer) else self.eos] = 20.0
                    break
        return SimpleNamespace(logits=logits)


def test_correct_model_scores_exact_match_one(task_data, tiny_tokenizer):
    items, meta = task_data
    rows = skills_task_rows(items, tiny_tokenizer, "sft")
    oracle = AnswerOracle(tiny_tokenizer, rows)
    tm = bm.local_task_manager(meta)
    for strategy in ("random", "confidence", "margin", "entropy"):
        lm = _lm(oracle, tiny_tokenizer, strategy=strategy, steps=3, greedy_check=False)
        summary = bm.skills_summary(bm.flatten(bm.run_tasks(lm, ["dgpt_skills"], tm)))
        assert summary["exact_match"] == 1.0, (strategy, lm.generations[:3])
        assert summary["n"] == len(items)
        assert all(summary[f"exact_match_{s}"] == 1.0 for s in SKILLS_CFG.skills)
        assert lm.stats["stopped"] == len(items)  # every answer ended at <|im_end|>


def test_registered_and_built_from_arg_string(tmp_path, tiny_model, tiny_tokenizer):
    assert get_model("dgpt") is DiffusionLM
    folder = save_model_folder(tiny_model, tiny_tokenizer, tmp_path / "model")
    lm = DiffusionLM.create_from_arg_string(f"pretrained={folder},strategy=random,steps=3,block_size=None",
                                            {"batch_size": 4, "device": "cpu"})
    assert lm.sampler.strategy == "random" and lm.sampler.steps == 3 and lm.sampler.block_size is None
    assert lm.batch_size == 4 and lm.max_len == 64
    out = lm.generate_until([_instance("generate_until", ("the red", {"until": ["\n"], "max_gen_toks": 4}))])
    assert isinstance(out[0], str)


def test_unset_arguments_follow_the_folder_then_the_library_defaults(tmp_path, tiny_model, tiny_tokenizer):
    bare = save_model_folder(tiny_model, tiny_tokenizer, tmp_path / "bare", {})  # no sampler defaults
    plain = DiffusionLM.create_from_arg_string(f"pretrained={bare}")
    assert plain.sampler == SamplerConfig(seed=EvalConfig().seed)  # no folder defaults: SamplerConfig's own
    defaults = EvalConfig()
    assert (plain.mc_num, plain.t_points, plain.mask_draws, plain.batch_size, plain.seed, plain.greedy_check) == (
        defaults.mc_num, defaults.ppl_t_points, defaults.ppl_mask_draws, defaults.batch_size, defaults.seed,
        defaults.greedy_check)
    folder = save_model_folder(tiny_model, tiny_tokenizer, tmp_path / "tuned",
                               {"strategy": "margin", "steps": 5, "temperature": 0.0, "max_new_tokens": 8})
    tuned = DiffusionLM.create_from_arg_string(f"pretrained={folder},steps=3")
    assert (tuned.sampler.strategy, tuned.sampler.steps, tuned.sampler.temperature) == ("margin", 3, 0.0)
    assert tuned.sampler.max_new_tokens == SamplerConfig().max_new_tokens  # the canvas is the task's


def test_skills_tasks_cover_the_library_skills():
    assert sorted(bm.task_skills()) == sorted(SkillsConfig().skills)
    assert bm.skills_tasks(SkillsConfig().skills) == ["dgpt_skills"]
    assert bm.skills_tasks(["add", "sort"]) == ["dgpt_skills_add", "dgpt_skills_sort"]
