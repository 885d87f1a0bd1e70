"""The data stages end to end on small sizes: folders, formats, manifests, caching, CLI."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import datasets
import pytest

from dgpt_core.config import (
    DataConfig,
    PretrainDataConfig,
    SFTDataConfig,
    SkillsConfig,
    SourceSpec,
    TokenizerConfig,
    load_run_config,
)
from dgpt_core.data.manifest import MANIFEST, is_complete, read_manifest, staging, write_manifest
from dgpt_core.data.sources import DataValidationError
from dgpt_core.data.stages import prepare_all, prepare_sft_stage
from dgpt_core.models.tokenizer import EOS, IM_END, PAD, load_tokenizer

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
    caplog.set_level("INFO")  # whatever the data logger is called
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
    with pytest.raises(DataValidationError, match=r"line 2: field 'messages\[0\].content': non-string content"):
        prepare_sft_stage(cfg, folders["tokenizer"], SEQ, tmp_path / "sft")
    assert not (tmp_path / "sft").exists() and not list(tmp_path.glob("sft.partial-*"))
    cfg.sft.sources = [SourceSpec(name=str(path), on_invalid="drop")]
    out = prepare_sft_stage(cfg, folders["tokenizer"], SEQ, tmp_path / "sft")
    report = json.loads((out / "report.json").read_text())
    assert report["failure_count"] == 1 and report["failures"][0]["row"] == 2


GOOD_LINE = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
BAD_UTF8 = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "caf\xe9"}]}\n'
BAD_COLUMN = BAD_UTF8.index(b"\xe9") + 1
BAD_UTF8_AT = f"line 2: field 'messages[1].content': not valid UTF-8 (byte 0xe9 at column {BAD_COLUMN})"


def test_an_undecodable_row_fails_a_strict_stage_in_one_line_and_is_counted_when_dropped(built, tmp_path):
    _, folders = built
    path = tmp_path / "chat.jsonl"
    path.write_bytes(GOOD_LINE + BAD_UTF8)
    cfg = small_cfg()
    cfg.validation_fraction = 0.0
    cfg.sft.sources = [SourceSpec(name=str(path))]
    with pytest.raises(DataValidationError) as err:
        prepare_sft_stage(cfg, folders["tokenizer"], SEQ, tmp_path / "sft")
    assert str(err.value) == f"{path}: {BAD_UTF8_AT}; set on_invalid: drop to skip and count invalid rows"
    cfg.sft.sources = [SourceSpec(name=str(path), on_invalid="drop")]
    out = prepare_sft_stage(cfg, folders["tokenizer"], SEQ, tmp_path / "sft")
    report, manifest = json.loads((out / "report.json").read_text()), read_manifest(out)
    dropped = [{"source": str(path), "file": str(path), "reason": "invalid_utf8", "rows": 1}]
    assert report["tables"]["Dropped rows"] == manifest["counts"]["dropped_rows"] == dropped
    assert report["failure_count"] == 1 and report["failures"][0]["line"] == 2
    assert report["failures"][0]["code"] == "invalid_utf8" and manifest["counts"]["sources"][0]["invalid"] == 1
    assert "| invalid_utf8 |" in (out / "report.md").read_text()


def test_a_stage_without_valid_rows_names_every_file_and_why_its_rows_were_dropped(built, tmp_path):
    from dgpt_core.data.stages import prepare_pretrain_stage

    _, folders = built
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(b'{"conversation": []}\n' + BAD_UTF8 + b'{"conversation": []}\n')
    b.write_text("")
    cfg = small_cfg()
    cfg.sft.sources = cfg.pretrain.sources = [SourceSpec(name=str(p), on_invalid="drop") for p in (a, b)]
    first = f"first dropped row: {a}: line 1: field 'messages': missing or empty message list (None)"
    with pytest.raises(ValueError) as err:
        prepare_sft_stage(cfg, folders["tokenizer"], SEQ, tmp_path / "sft")
    assert str(err.value).splitlines() == [
        f"no valid SFT rows: {a}: 3 read, 3 dropped (missing_messages: 2, invalid_utf8: 1); {b}: 0 read", f"  {first}"]
    with pytest.raises(ValueError) as err:
        prepare_pretrain_stage(cfg, folders["tokenizer"], SEQ, tmp_path / "pretrain")
    assert str(err.value).splitlines() == [
        f"no valid pretraining rows: {a}: 3 read, 3 dropped (missing_text: 2, invalid_utf8: 1); {b}: 0 read",
        f"  first dropped row: {a}: line 1: field 'text': missing or non-string field 'text'"]
    # valid rows that all go elsewhere: the message says where they went
    a.write_bytes(GOOD_LINE * 2)
    cfg.validation_fraction = 0.0
    cfg.sft.sources = [SourceSpec(name=str(a), weight=0.1)]
    with pytest.raises(ValueError) as err:
        prepare_sft_stage(cfg, folders["tokenizer"], SEQ, tmp_path / "sft")
    assert str(err.value) == f"no SFT training examples: {a}: 2 read, 2 valid (2 train, 0 validation), 0 taken at weight 0.1"
    assert not list(tmp_path.glob("*.partial-*")) and not (tmp_path / "sft").exists()


def test_staging_without_manifest_is_never_complete(tmp_path):
    target = tmp_path / "stage"
    with pytest.raises(RuntimeError, match="no manifest"), staging(target) as tmp:
        (tmp / "data.bin").write_text("half")
    assert not target.exists() and not is_complete(target)
    with staging(target) as tmp:
        write_manifest(tmp, {"stage": "x", "key": "k"})
    assert is_complete(target, "k") and not is_complete(target, "other")


def test_default_bpe_keeps_skill_words_single_tokens(tmp_path):
    """The embedded default mixture trains a 1024 BPE where every skill word is one token."""
    cfg = DataConfig(skills=SkillsConfig(train_per_skill=1500, validation_per_skill=0, test_per_skill=0))
    from dgpt_core.data.stages import prepare_tokenizer_stage

    folder = prepare_tokenizer_stage(TokenizerConfig(), cfg, tmp_path / "tok")
    summary = json.loads((folder / "report.json").read_text())["summary"]
    assert summary["multi_token_skill_words"] == "none"
    assert summary["copyable_answers"] == "100/100"


# --------------------------------------------------------------------------- `dgpt prepare`

STAGES = ("tokenizer", "pretrain", "sft")
SMALL = ["data.skills.train_per_skill=20", "data.skills.validation_per_skill=2", "data.skills.test_per_skill=3",
         "data.pretrain.sources=[{name: chitchat, max_items: 50}, {name: skills}]",
         "data.sft.sources=[{name: skills}, {name: chitchat, max_items: 30}]", "tokenizer.vocab_size=400"]


def dgpt(*args: str) -> tuple[int, str, str]:
    """`dgpt ARGS` through the real dispatcher: (exit code, stdout, stderr)."""
    from flows.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def sets(*overrides: str) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """`dgpt prepare --preset ci` with small sizes and output_dir set: (data root, exit code, stdout, stderr)."""
    root = tmp_path_factory.mktemp("prepare")
    code, out, err = dgpt("prepare", "--preset", "ci", *sets(f"output_dir={root}", *SMALL))
    return root / "ci" / "data", code, out, err


def test_dgpt_prepare_writes_each_stage_where_and_as_the_config_says(prepared):
    data, code, out, err = prepared
    assert code == 0, err
    # one line per stage: its folder (under <output_dir>/<preset>/data) and its manifest's headline numbers
    lines = out.strip().splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == list(STAGES)
    for name, line in zip(STAGES, lines):
        folder, summary = line.split(": ", 1)[1].split("  ", 1)
        assert Path(folder) == data / name and is_complete(data / name)
        m = read_manifest(data / name)
        assert m["stage"] == name and json.loads(summary) == {"stage": name, "splits": m.get("splits"),
                                                             "seconds": m.get("seconds")}
    # every --set reached its stage
    run = load_run_config("ci", SMALL)
    assert len(load_tokenizer(data / "tokenizer")) == 400
    pretrain = read_manifest(data / "pretrain")
    assert {r["source"]: r["rows_read"] for r in pretrain["counts"]["sources"]}["chitchat"] == 50
    assert pretrain["max_seq_len"] == run.model.max_seq_len == 128
    sft = read_manifest(data / "sft")
    skills_row = next(r for r in sft["counts"]["sources"] if r["source"] == "skills")
    assert skills_row["examples"] == 20 * len(run.data.skills.skills)
    assert len(datasets.load_from_disk(str(data / "sft"))["test"]) == 3 * len(run.data.skills.skills)
    assert read_manifest(data / "pretrain")["tokenizer"]["fingerprint"] == sft["tokenizer"]["fingerprint"]


def test_dgpt_prepare_reuses_finished_stages_and_force_rebuilds_one(prepared):
    data, code, _, err = prepared
    assert code == 0, err
    root = data.parent.parent
    mtimes = {name: (data / name / MANIFEST).stat().st_mtime_ns for name in STAGES}
    fingerprint = read_manifest(data / "tokenizer")["tokenizer"]["fingerprint"]
    assert dgpt("prepare", "--preset", "ci", *sets(f"output_dir={root}", *SMALL))[0] == 0
    assert {name: (data / name / MANIFEST).stat().st_mtime_ns for name in STAGES} == mtimes, "nothing rebuilt"
    code, out, err = dgpt("prepare", "--preset", "ci", "--stage", "tokenizer", "--force",
                          *sets(f"output_dir={root}", *SMALL))
    assert code == 0, err
    assert [line.split(": ", 1)[0] for line in out.strip().splitlines()] == ["tokenizer"]
    after = {name: (data / name / MANIFEST).stat().st_mtime_ns for name in STAGES}
    assert after["tokenizer"] != mtimes["tokenizer"] and after["pretrain"] == mtimes["pretrain"]
    assert read_manifest(data / "tokenizer")["tokenizer"]["fingerprint"] == fingerprint, "deterministic rebuild"


def test_dgpt_prepare_one_stage_into_an_output_dir(prepared, tmp_path):
    data, _, _, _ = prepared
    code, out, err = dgpt("prepare", "--preset", "ci", "--stage", "tokenizer", "--output-dir", str(tmp_path),
                          *sets(*SMALL))
    assert code == 0, err
    assert out.startswith(f"tokenizer: {tmp_path / 'tokenizer'}  ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer"]
    assert read_manifest(tmp_path / "tokenizer")["key"] == read_manifest(data / "tokenizer")["key"]


def test_dgpt_prepare_list_sources_prints_the_registry_and_builds_nothing(tmp_path):
    code, out, _ = dgpt("prepare", "--list-sources", "--output-dir", str(tmp_path / "data"))
    assert code == 0
    for name in ("skills", "chitchat", "fineweb-edu", "smol-smoltalk", "HuggingFaceFW/fineweb-edu"):
        assert name in out
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(("args", "named"), [
    (["--set", "data.bogus=1"], "data.bogus"),
    (["--set", "data.validation_fraction=2"], "data.validation_fraction"),
    (["--set", "data.skills.train_per_skill"], "data.skills.train_per_skill"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--set", "data.pretrain.sources=[{name: fineweb-edu}]"], "HuggingFaceFW/fineweb-edu"),  # offline Hub source
], ids=["unknown key", "bad value", "no value", "unknown preset", "offline hub source"])
def test_dgpt_prepare_with_a_bad_config_exits_2_with_one_error_line(args, named, tmp_path, monkeypatch):
    from dgpt_core import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.hub_reachable.cache_clear()
    preset = [] if "--preset" in args else ["--preset", "ci"]
    code, out, err = dgpt("prepare", *preset, "--output-dir", str(tmp_path / "data"), *args)
    hub.hub_reachable.cache_clear()
    assert code == 2 and out == ""
    assert "Traceback" not in err and named in err
    assert [line for line in err.splitlines() if line.startswith("dgpt prepare: ")] == \
        [err.splitlines()[0]], "one error line, first"
    assert not [p for p in tmp_path.rglob("*") if p.is_dir() and is_complete(p)], "no stage was written"


def test_dgpt_prepare_with_an_undecodable_row_exits_2_naming_file_line_and_field(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_bytes(GOOD_LINE + BAD_UTF8)
    small = [s for s in SMALL if not s.startswith("data.sft.sources")]
    code, out, err = dgpt("prepare", "--preset", "ci", "--stage", "sft", "--output-dir", str(tmp_path / "data"),
                          *sets(*small, f"data.sft.sources=[{{name: {path}}}]"))
    assert code == 2 and out == "" and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("dgpt prepare: ")] == \
        [f"dgpt prepare: {path}: {BAD_UTF8_AT}; set on_invalid: drop to skip and count invalid rows"]


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
