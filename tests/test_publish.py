"""Hub publishing: the staged folder and model card, the verified dry run (fresh process), and the
upload path against a local fake Hub (one atomic commit, retries, no token anywhere)."""

from __future__ import annotations

import argparse
import json
import logging
import time
import traceback
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard

from deploy.model_card import eval_records
from deploy.publish import PublishError, list_upload_files, publish, stage_publish_folder
from deploy.publish_cli import add_publish_parser
from dgpt_core.config import ModelConfig, load_run_config
from dgpt_core.config.publish import PublishConfig
from dgpt_core.hub import offline_vars
from dgpt_core.models.backbone import build_model
from dgpt_core.models.export import PIPELINE_FILES, save_model_folder

from .fake_hub import FakeHub

TOKEN = "hf_fAkEtOkEn0123456789abcdefSECRET"
REPO = "tester/dgpt-tiny"
MODEL_FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    *PIPELINE_FILES,
    "run_config.yaml",
    "train_metrics.json",
}
EVAL_FILES = {"metrics.json", "report.md", "repetition.png"}
METRICS = {
    "ppl_bound": {
        "value": 42.5,
        "stderr": 1.5,
        "n_tokens": 384,
        "dataset": "held-out text",
        "conditional": {"value": 7.25, "stderr": 0.5, "n_tokens": 30, "dataset": "held-out answers"},
    },
    "benchmarks": {
        "dgpt_skills": {
            "confidence": {"exact_match": 0.75, "exact_match_add": 1.0, "n": 21.0, "nfe": 16.0},
            "random": {"exact_match": 0.5, "exact_match_add": 0.5, "n": 21.0, "nfe": 16.0},
        },
        "dgpt_skills_steps": {"confidence": {"steps": [4.0, 8.0], "exact_match": [0.1, 0.2]}},
        "dgpt_chitchat_mc": {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": float("nan"), "n": 3.0},
    },
    "repetition": {"confidence": {"distinct_2": 0.8, "rep_4": 0.1, "loop_rate": 0.0, "stop_rate": 1.0}},
    "meta": {"model": {"path": "/nowhere"}},
}


@pytest.fixture(scope="module")
def model_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_seq_len=64)
    model = build_model(cfg, tiny_tokenizer).eval()
    out = save_model_folder(
        model,
        tiny_tokenizer,
        tmp_path_factory.mktemp("run") / "sft" / "model",
        {"steps": 4, "max_new_tokens": 8},
    )
    load_run_config("ci").save_yaml(out / "run_config.yaml")
    (out / "train_metrics.json").write_text(json.dumps({"train_loss": 3.5, "parameters": 1}))
    return out


@pytest.fixture(scope="module")
def eval_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evals")
    full, partial = root / "sft", root / "pretrain"
    for folder, metrics in [
        (full, METRICS),
        (partial, {"benchmarks": {"dgpt_skills": {}}, "repetition": None}),
    ]:
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps(metrics))
        (folder / "report.md").write_text(f"# Eval report: {folder.name}\n")
        (folder / "repetition.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
        (folder / "task_data").mkdir()  # sub-folders are not published
        (folder / "task_data" / "items.jsonl").write_text("{}\n")
    return {"sft": full, "pretrain": partial, "untrained": root / "missing"}


def expected_files(*evals: str) -> set[str]:
    return MODEL_FILES | {"README.md"} | {f"eval/{name}/{f}" for name in evals for f in EVAL_FILES}


@pytest.fixture
def online(monkeypatch):
    """Undo the test suite's offline mode (the fake Hub is local) and hand out the token."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_DEBUG", True)  # also log curl-style requests
    monkeypatch.setenv("HF_TOKEN", TOKEN)


def upload_cfg(hub: FakeHub, **kw) -> PublishConfig:
    return PublishConfig(repo_id=REPO, endpoint=hub.url, verify=False, backoff_seconds=0.01, **kw)


def test_config_fields_documented_and_validated():
    assert all(f.description for f in PublishConfig.model_fields.values())
    assert PublishConfig.model_validate_json(PublishConfig(repo_id="a/b").model_dump_json()).repo_id == "a/b"
    bad_values = (
        {"repo_id": "a/b/c"},
        {"mode": "pull_request", "revision": "dev"},
        {"tokens": "x"},
        {"request_timeout_seconds": 0},
    )
    for bad in bad_values:
        with pytest.raises(ValueError):
            PublishConfig(**bad)


def test_eval_records_tolerate_partial_metrics():
    assert eval_records({}) == []
    assert eval_records({"ppl_bound": {}, "benchmarks": {"x": None}, "repetition": {"s": None}}) == []
    labels = {r.label: r.value for r in eval_records(METRICS)}
    assert labels["dgpt_skills: exact_match [confidence]"] == 0.75
    assert labels["dgpt_heldout_answers_elbo: perplexity upper bound"] == 7.25
    assert labels["dgpt_chitchat_mc: acc"] == 0.5 and "dgpt_chitchat_mc: acc_norm" not in labels  # NaN
    assert not any(k in label for label in labels for k in ("exact_match_add", "nfe", "stderr", ": n "))


def test_stage_folder_and_model_card(model_dir, eval_dirs, tmp_path):
    cfg = PublishConfig(repo_id=REPO, tags=["tiny"])
    out = stage_publish_folder(model_dir, tmp_path / "publish", eval_dirs, cfg=cfg)
    assert set(list_upload_files(out)) == expected_files("sft", "pretrain")  # "untrained" is missing

    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.license == "mit" and "tiny" in data.tags
    assert "model-index" in data.to_dict() and data.model_name == "dgpt-tiny"
    results = {(r.dataset_type, r.metric_type, r.metric_config): r.metric_value for r in data.eval_results}
    assert results[("dgpt_skills", "exact_match", "confidence")] == 0.75
    assert results[("dgpt_heldout_text_elbo", "perplexity", None)] == 42.5
    assert f'pipeline("text-diffusion", model="{REPO}", trust_remote_code=True)' in card.text
    for section in ("## Training", "## Evaluation", "## Limitations", "| sft | pretrain |", "`ci`"):
        assert section in card.text
    assert "![pretrain repetition](eval/pretrain/repetition.png)" in card.text

    (out / "stale.txt").write_text("left over")
    again = stage_publish_folder(model_dir, out, {"sft": eval_dirs["sft"]}, cfg=cfg)
    assert set(list_upload_files(again)) == expected_files("sft")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("not a publish folder")
    with pytest.raises(PublishError, match="refusing"):
        stage_publish_folder(model_dir, tmp_path / "other")
    with pytest.raises(PublishError, match="outside the model folder"):
        stage_publish_folder(model_dir, model_dir / "publish")


def test_dry_run_loads_and_generates_in_a_fresh_process(model_dir, eval_dirs, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    result = publish(model_dir, tmp_path / "publish", PublishConfig(repo_id=REPO), eval_dirs=eval_dirs)
    assert not result.uploaded and result.dry_run_reason == "no token in $HF_TOKEN"
    assert result.verified and result.verification["pipeline"].startswith("transformers_modules.")
    assert isinstance(result.verification["text"]["generated_text"], str)
    assert result.verification["chat"]["nfe"] == 4  # the folder's sampler defaults
    assert set(result.files) == expected_files("sft", "pretrain")


def test_offline_or_no_repo_is_a_dry_run_without_requests(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with FakeHub() as hub:
        offline = publish(model_dir, tmp_path / "a", upload_cfg(hub))
        no_repo = publish(model_dir, tmp_path / "b", upload_cfg(hub).model_copy(update={"repo_id": None}))
    assert offline.dry_run_reason.startswith("offline") and no_repo.dry_run_reason == "no repo_id"
    assert hub.requests == [] and not offline.uploaded


def test_upload_is_one_atomic_commit_with_retry_and_no_token_anywhere(
    model_dir, eval_dirs, tmp_path, online, caplog, capfd
):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    with FakeHub(fail_commit=[503]) as hub:
        result = publish(model_dir, tmp_path / "publish", upload_cfg(hub), eval_dirs=eval_dirs)

    assert result.uploaded and result.attempts["create_commit"] == 2  # 503 once, then accepted
    assert len(hub.commit_attempts()) == 2 and len(hub.commits) == 1
    commit = hub.commits[0]
    assert commit.repo == REPO and commit.revision == "main" and not commit.create_pr
    assert set(commit.files) == expected_files("sft", "pretrain") == set(result.files)
    assert commit.files["model.safetensors"] == (model_dir / "model.safetensors").read_bytes()
    assert (
        b"model-index:" in commit.files["README.md"]
        and commit.header["summary"] == "Upload diffusionGPT model"
    )
    assert commit.deleted == []  # the new repo only held .gitattributes, which is kept
    assert result.commit_oid and result.commit_url.endswith(result.commit_oid)

    # the token travels only in the Authorization header
    assert hub.requests and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    assert all(TOKEN.encode() not in r.body for r in hub.requests)
    assert all(
        TOKEN not in json.dumps({k: v for k, v in r.headers.items() if k != "authorization"})
        for r in hub.requests
    )
    assert all(TOKEN.encode() not in content for content in commit.files.values())
    assert all(TOKEN.encode() not in (result.folder / f).read_bytes() for f in result.files)
    out, err = capfd.readouterr()
    assert "retry 1/4" in caplog.text and "<TOKEN>" in caplog.text  # curl-style debug log, redacted
    for text in (caplog.text, out, err, json.dumps(result.to_dict())):
        assert TOKEN not in text


def test_final_error_is_scrubbed_and_not_retried_when_not_retryable(model_dir, tmp_path, online, caplog):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    with FakeHub(fail_commit=[503, 400], error_echo=f"Authorization: Bearer {TOKEN}") as hub:
        with pytest.raises(PublishError) as info:
            publish(model_dir, tmp_path / "publish", upload_cfg(hub, max_retries=3))
    assert len(hub.commit_attempts()) == 2 and hub.commits == []  # 503 retried, 400 final
    message = "".join(traceback.format_exception(info.value))
    assert "create_commit failed after 2 attempts" in message and "<token>" in message
    assert TOKEN not in message and TOKEN not in caplog.text


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"HF_HUB_OFFLINE": "1"}, "offline mode (HF_HUB_OFFLINE=1)"),
        ({"TRANSFORMERS_OFFLINE": "true"}, "offline mode (TRANSFORMERS_OFFLINE=true)"),
        (
            {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
            "offline mode (HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1)",
        ),
        ({}, "offline mode (huggingface_hub.constants.HF_HUB_OFFLINE)"),  # set when it was imported
        ({"HF_DATASETS_OFFLINE": "1"}, None),  # about dataset downloads: the upload goes ahead
    ],
)
def test_dry_run_reason_names_the_offline_variables(model_dir, tmp_path, online, monkeypatch, env, reason):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    if not env:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert offline_vars() == env
    with FakeHub() as hub:
        result = publish(model_dir, tmp_path / "publish", upload_cfg(hub))
    assert result.dry_run_reason == reason and result.uploaded == (reason is None)
    assert bool(hub.requests) == (reason is None)


def test_a_hung_commit_times_out_and_is_retried(model_dir, tmp_path, online):
    factory = huggingface_hub.utils._http._GLOBAL_CLIENT_FACTORY
    with FakeHub(hang_commit=1, hang_seconds=60) as hub:
        start = time.monotonic()
        result = publish(model_dir, tmp_path / "publish", upload_cfg(hub, request_timeout_seconds=0.5))
        elapsed = time.monotonic() - start
    assert result.uploaded and result.attempts["create_commit"] == 2  # timed out once, then accepted
    assert len(hub.commit_attempts()) == 2 and len(hub.commits) == 1
    assert elapsed < 10, f"the hung commit blocked the publish for {elapsed:.1f} s"
    # the bounded client is gone: huggingface_hub's own factory and unbounded client are back
    assert huggingface_hub.utils._http._GLOBAL_CLIENT_FACTORY is factory
    assert huggingface_hub.get_session().timeout.read is None


def test_a_hub_that_never_answers_fails_cleanly_and_removes_the_new_repo(model_dir, tmp_path, online):
    with FakeHub(hang_commit=100, hang_seconds=60) as hub:
        start = time.monotonic()
        with pytest.raises(PublishError) as info:
            publish(
                model_dir, tmp_path / "publish", upload_cfg(hub, request_timeout_seconds=0.5, max_retries=2)
            )
        elapsed = time.monotonic() - start
    message = str(info.value)
    assert "create_commit failed after 3 attempts: ReadTimeout" in message
    assert f"the repo {REPO} created by this run was deleted" in message and TOKEN not in message
    assert len(hub.commit_attempts()) == 3 and hub.repos == {}
    assert elapsed < 10, f"the hung commit blocked the publish for {elapsed:.1f} s"


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_commit_deletes_only_a_repo_this_run_created(model_dir, tmp_path, online, existing):
    with FakeHub(fail_commit=[503, 503, 503]) as hub:
        if existing:
            hub.repos[REPO] = {"README.md": b"an earlier model"}
        with pytest.raises(PublishError) as info:
            publish(model_dir, tmp_path / "publish", upload_cfg(hub, max_retries=2))
    assert "create_commit failed after 3 attempts: HfHubHTTPError" in str(info.value) and hub.commits == []
    deletes = [r for r in hub.requests if r.method == "DELETE"]
    if existing:
        assert hub.repos == {REPO: {"README.md": b"an earlier model"}} and deletes == []
        assert "created by this run" not in str(info.value)
    else:
        assert hub.repos == {} and len(deletes) == 1
        assert str(info.value).endswith(f"the repo {REPO} created by this run was deleted")


def test_pull_request_mode_merges_and_deletes_stale_files(model_dir, eval_dirs, tmp_path, online):
    with FakeHub() as hub:
        publish(model_dir, tmp_path / "first", upload_cfg(hub), eval_dirs={"sft": eval_dirs["sft"]})
        result = publish(model_dir, tmp_path / "second", upload_cfg(hub, mode="pull_request"))
    assert len(hub.commits) == 2 and hub.commits[1].create_pr and hub.merged == [(REPO, 2)]
    assert sorted(hub.commits[1].deleted) == sorted(f"eval/sft/{f}" for f in EVAL_FILES)
    assert result.pr_url.endswith("/discussions/2") and set(hub.repos[REPO]) == expected_files() | {
        ".gitattributes"
    }


def test_cli(model_dir, eval_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    parser = argparse.ArgumentParser(prog="dgpt")
    add_publish_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "publish"
    argv = ["publish", str(model_dir), "--repo-id", REPO, "--dry-run", "--no-verify", "--out", str(out)]
    args = parser.parse_args([*argv, "--eval-dir", f"sft={eval_dirs['sft']}", "--set", "private=false"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "dry run (dry_run requested)" in printed and TOKEN not in printed
    assert (out / "eval" / "sft" / "metrics.json").is_file()
    bad = parser.parse_args([*argv, "--eval-dir", "no-equals-sign"])
    assert bad.func(bad) == 2 and "NAME=DIR" in capsys.readouterr().err
