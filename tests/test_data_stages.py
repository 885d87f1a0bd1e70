"""The data stages end to end on small sizes: folders, formats, manifests, caching, CLI."""

from __future__ import annotations

import json

import datasets
import pytest

from dgpt_core.data.config import (
    DataConfig,
    PretrainDataConfig,
    SFTDataConfig,
    SkillsConfig,
    SourceSpec,
    TokenizerConfig,
)
from dgpt_core.data.manifest import MANIFEST, is_complete, read_manifest, staging, write_manifest
from dgpt_core.data.sources import DataValidationError
from dgpt_core.data.stages import prepare_all, prepare_sft_stage
from dgpt_core.tokenizer import EOS, IM_END, PAD, load_tokenizer

SEQ = 96


def small_cfg(**sft) -> DataConfig:
    return DataConfig(
        validation_fraction=0.1,
        skills=SkillsConfig(train_per_skill=40, validation_per_skill=4, test_per_skill=6),
        pretrain=PretrainDataConfig(sources=[SourceSpec(name="chitchat", max_items=120), SourceSpec(name="skills")]),
        sft=SFTDataConfig(sources=[SourceSpec(name="skills"), SourceSpec(name="chitchat", max_items=60, weight=0.5)],
                          **sft),
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    folders = prepare_all(small_cfg(), TokenizerConfig(vocab_size=400, corpus_max_chars=300_000), SEQ, root)
    return root, folders


def test_folders_and_manifests(built):
    root, folders = built
    assert set(folders) == {"tokenizer", "pretrain", "sft"}
    for name, folder in folders.items():
        assert folder == root / name and is_complete(folder)
        m = read_manifest(folder)
        assert m["stage"] == name and m["code_version"] and m["key"]
        assert (folder / "report.md").exists() and (folder / "report.json").exists()
        assert not list(root.glob(f"{name}.partial-*"))
    tok = load_tokenizer(folders["tokenizer"])
    fp = read_manifest(folders["tokenizer"])["tokenizer"]["fingerprint"]
    assert read_manifest(folders["pretrain"])["tokenizer"]["fingerprint"] == fp
    assert read_manifest(folders["sft"])["max_seq_len"] == SEQ
    assert tok.chat_template and len(tok) == 400


def test_pretrain_dataset_format(built):
    _, folders = built
    data = datasets.load_from_disk(str(folders["pretrain"]))
    m = read_manifest(folders["pretrain"])
    assert set(data) == {"train", "validation"}
    for split, ds in data.items():
        lengths = [len(x) for x in ds["input_ids"]]
        assert all(n == SEQ for n in lengths[:-1]) and 0 < lengths[-1] <= SEQ
        assert sum(lengths) == m["tokens"][split]["tokens_in"] == m["tokens"][split]["tokens_out"]
    tok = load_tokenizer(folders["tokenizer"])
    text = tok.decode(data["train"][0]["input_ids"], skip_special_tokens=False)
    assert EOS in text and "user: " in text


def test_sft_dataset_format(built):
    _, folders = built
    tok = load_tokenizer(folders["tokenizer"])
    data = datasets.load_from_disk(str(folders["sft"]))
    assert set(data) == {"train", "validation", "test"}
    assert data["train"].column_names == ["input_ids", "eligible_mask", "source", "skill"]
    pad = tok.convert_tokens_to_ids(PAD)
    for ex in data["train"].select(range(50)):
        assert len(ex["input_ids"]) == len(ex["eligible_mask"]) <= SEQ
        assert pad not in ex["input_ids"]
        answer = tok.decode([t for t, m in zip(ex["input_ids"], ex["eligible_mask"]) if m], skip_special_tokens=False)
        assert IM_END in answer and answer.index(IM_END) > 0
    assert set(data["test"]["skill"]) == set(SkillsConfig().skills)
    # the held-out skills are exported for the eval suite and never trained on
    rows = [json.loads(line) for line in (folders["sft"] / "skills_test.jsonl").read_text().splitlines()]
    assert len(rows) == 6 * len(SkillsConfig().skills)
    train_prompts = {tok.decode(ids) for ids in data["train"]["input_ids"]}
    assert not any(r["prompt"] in p for r in rows for p in list(train_prompts)[:300])
    counts = read_manifest(folders["sft"])["counts"]["sources"]
    skills_row = next(r for r in counts if r["source"] == "skills")
    assert skills_row["examples"] == skills_row["assistant_turns"] == 40 * len(SkillsConfig().skills)


def test_reuse_and_force(built, caplog):
    root, folders = built
    before = read_manifest(folders["sft"])["created_at"], (folders["sft"] / MANIFEST).stat().st_mtime_ns
    caplog.set_level("INFO", logger="dgpt.data")
    prepare_all(small_cfg(), TokenizerConfig(vocab_size=400, corpus_max_chars=300_000), SEQ, root)
    assert (folders["sft"] / MANIFEST).stat().st_mtime_ns == before[1]
    assert "reusing" in caplog.text
    # a changed setting rebuilds the stage (its key changes)
    other = root / "sft-none"
    prepare_sft_stage(small_cfg(answer_padding="none"), folders["tokenizer"], SEQ, other)
    ex = datasets.load_from_disk(str(other))["train"][0]
    tok = load_tokenizer(folders["tokenizer"])
    assert tok.decode([t for t, m in zip(ex["input_ids"], ex["eligible_mask"]) if m], skip_special_tokens=False).endswith(IM_END)
    assert read_manifest(other)["key"] != read_manifest(folders["sft"])["key"]


def test_local_invalid_file_fails_stage_with_row(built, tmp_path):
    _, folders = built
    path = tmp_path / "chat.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                    '{"messages": [{"role": "user", "content": null}, {"role": "assistant", "content": "x"}]}\n')
    cfg = small_cfg()
    cfg.validation_fraction = 0.0  # the one valid row must land in train (the hash depends on the tmp path)
    cfg.sft.sources = [SourceSpec(name=str(path))]
    with pytest.raises(DataValidationError, match=r"row 2: field 'messages\[0\].content': non-string content"):
        prepare_sft_stage(cfg, folders["tokenizer"], SEQ, tmp_path / "sft")
    assert not (tmp_path / "sft").exists() and not list(tmp_path.glob("sft.partial-*"))
    cfg.sft.sources = [SourceSpec(name=str(path), on_invalid="drop")]
    out = prepare_sft_stage(cfg, folders["tokenizer"], SEQ, tmp_path / "sft")
    report = json.loads((out / "report.json").read_text())
    assert report["failure_count"] == 1 and report["failures"][0]["row"] == 2


def test_staging_without_manifest_is_never_complete(tmp_path):
    target = tmp_path / "stage"
    with pytest.raises(RuntimeError, match="no manifest"), staging(target) as tmp:
        (tmp / "data.bin").write_text("half")
    assert not target.exists() and not is_complete(target)
    with staging(target) as tmp:
        write_manifest(tmp, {"stage": "x", "key": "k"})
    assert is_complete(target, "k") and not is_complete(target, "other")


def test_cli_prepare_parser():
    import argparse

    from dgpt_core.data.cli import add_prepare_parser

    parser = argparse.ArgumentParser()
    add_prepare_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prepare", "--preset", "ci", "--set", "data.num_proc=2", "--output-dir", "x"])
    assert args.preset == "ci" and args.overrides == ["data.num_proc=2"] and args.output_dir == "x"
    assert callable(args.func)


def test_default_bpe_keeps_skill_words_single_tokens(tmp_path):
    """The embedded default mixture trains a 1024 BPE where every skill word is one token."""
    cfg = DataConfig(skills=SkillsConfig(train_per_skill=1500, validation_per_skill=0, test_per_skill=0))
    from dgpt_core.data.stages import prepare_tokenizer_stage

    folder = prepare_tokenizer_stage(TokenizerConfig(), cfg, tmp_path / "tok")
    summary = json.loads((folder / "report.json").read_text())["summary"]
    assert summary["multi_token_skill_words"] == "none"
    assert summary["copyable_answers"] == "100/100"


def test_dgpt_prepare_ci_preset(tmp_path, capsys):
    from flows.cli import main

    overrides = ["--set", "data.skills.train_per_skill=20", "--set", "data.pretrain.sources=[{name: chitchat, max_items: 50}, {name: skills}]",
                 "--set", "data.sft.sources=[{name: skills}, {name: chitchat, max_items: 30}]"]
    assert main(["prepare", "--preset", "ci", "--output-dir", str(tmp_path), *overrides]) == 0
    out = capsys.readouterr().out
    for name in ("tokenizer", "pretrain", "sft"):
        assert f"{name}: {tmp_path / name}" in out and is_complete(tmp_path / name)
    assert main(["prepare", "--preset", "ci", "--output-dir", str(tmp_path), "--set", "data.pretrain.sources=[{name: fineweb-edu}]"]) == 2
    assert "HuggingFaceFW/fineweb-edu" in capsys.readouterr().err


def test_pretrained_tokenizer_stage(tmp_path, monkeypatch):
    from dgpt_core import hub
    from dgpt_core.data.stages import prepare_tokenizer_stage

    folder = prepare_tokenizer_stage(TokenizerConfig(kind="pretrained", name_or_path="gpt2-offline"), small_cfg(), tmp_path / "gpt2")
    tok = load_tokenizer(folder)
    assert len(tok) >= 50257 and tok.chat_template
    assert read_manifest(folder)["tokenizer"]["vocab_size"] == len(tok)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.hub_reachable.cache_clear()
    with pytest.raises(RuntimeError, match="'gpt2'"):
        prepare_tokenizer_stage(TokenizerConfig(kind="pretrained", name_or_path="gpt2"), small_cfg(), tmp_path / "hub")
    hub.hub_reachable.cache_clear()
