"""`dgpt serve` on loopback with the official openai client: model list, chat and plain
completions, streaming equal to the whole answer for a seed, live denoising, stop sequences,
batching of concurrent requests, and the 400 / 401 refusals (the server serving on after them)."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from deploy.serve.app import create_app
from deploy.serve.jobs import fit_canvas
from deploy.serve.settings import ServeSettings
from dgpt_core._cli.generate import load_pipeline
from dgpt_core.cli_errors import run_command
from dgpt_core.config import ModelConfig
from dgpt_core.generation.options import SamplerConfig
from dgpt_core.generation.pipeline import MASK_SYMBOL
from dgpt_core.models.backbone import build_model
from dgpt_core.models.export import save_model_folder
from dgpt_core.models.info import ModelInfo
from flows.cli import build_parser

KEY = "test-key-not-secret"
CANVAS = 8
# a long collection window, so that concurrent requests batch on a busy machine too; every other
# request is seeded, and a seeded request is decoded at once, alone
LIMITS = {"max_n": 2, "max_tokens_cap": 40, "max_body_bytes": 20_000, "batch_window_ms": 1000.0,
          "max_batch_size": 8}
QUESTION = [{"role": "user", "content": "the red cat sat on the"}]


@pytest.fixture(scope="module")
def model_dir(tiny_tokenizer, tmp_path_factory) -> Path:
    """A random-weight SFT folder (64-token context) whose defaults sample an 8-token canvas at
    temperature 1, so answers depend on the seed."""
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_seq_len=64)
    model = build_model(cfg, tiny_tokenizer).eval()
    info = ModelInfo("sft", answer_canvas=CANVAS, answer_padding="eos", context_messages=4)
    defaults = {"strategy": "confidence", "steps": CANVAS, "max_new_tokens": CANVAS, "temperature": 1.0}
    return save_model_folder(model, tiny_tokenizer, tmp_path_factory.mktemp("serve") / "tiny-sft", defaults, info)


@pytest.fixture(scope="module")
def base_url(model_dir) -> Iterator[str]:
    yield from serving(model_dir)


def serving(model_dir: Path) -> Iterator[str]:
    """The server on a free loopback port, in a background thread, with an API key and small limits."""
    settings = ServeSettings(model_dir=str(model_dir), port=0, api_key_env="DGPT_TEST_KEY", api_key=KEY, **LIMITS)
    server = uvicorn.Server(uvicorn.Config(create_app(load_pipeline(str(model_dir), "cpu"), settings),
                                           log_level="warning"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def chat(client: openai.OpenAI, **kwargs):
    return client.chat.completions.create(model="tiny-sft", messages=QUESTION, **kwargs)


def streamed_chat(client: openai.OpenAI, **kwargs) -> tuple[str, list[dict], dict]:
    """The streamed answer: its text, the live canvases (`denoise` objects) and the last chunk's extras."""
    text, canvases, last = "", [], {}
    for chunk in chat(client, stream=True, **kwargs):
        extra = chunk.model_extra or {}
        if "denoise" in extra:
            canvases.append(extra["denoise"])
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.finish_reason:
                last = {"finish_reason": choice.finish_reason, **extra}
    return text, canvases, last


def test_model_list_names_the_folder_with_its_sampler_defaults(client):
    (model,) = client.models.list().data
    assert model.id == "tiny-sft"
    assert model.model_extra["canvas"] == CANVAS
    assert model.model_extra["sampler_defaults"]["strategy"] == "confidence"


def test_chat_completion_counts_tokens_and_forward_passes(client, tiny_tokenizer):
    reply = chat(client, seed=3, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    prompt = tiny_tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert reply.usage.prompt_tokens == len(tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    # an answer cut by the canvas has all of its tokens; one ended by a stop token has fewer
    reasons = [c.finish_reason for c in reply.choices]
    full = CANVAS * reasons.count("length")
    assert full <= reply.usage.completion_tokens <= full + (CANVAS - 1) * reasons.count("stop")
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert 1 <= reply.model_extra["nfe"] <= CANVAS


def test_streamed_text_equals_whole_text_for_a_seed(client):
    whole = chat(client, seed=11)
    text, canvases, last = streamed_chat(client, seed=11)
    assert whole.choices[0].message.content, "the seed should give a non-empty answer"
    assert text == whole.choices[0].message.content
    assert last["finish_reason"] == whole.choices[0].finish_reason
    assert last["nfe"] == whole.model_extra["nfe"]
    assert canvases == []  # live canvases are opt-in
    assert chat(client, seed=12).choices[0].message.content != text


def test_live_denoising_streams_every_canvas_until_the_answer(client):
    text, canvases, last = streamed_chat(client, seed=11, extra_body={"denoise": True})
    masks = [state["canvas"][0].count(MASK_SYMBOL) for state in canvases]
    assert masks[0] == CANVAS and len(canvases) >= 2
    assert masks == sorted(masks, reverse=True) and masks[-1] < CANVAS
    assert [s["step"] for s in canvases] == list(range(len(canvases)))
    assert text == chat(client, seed=11).choices[0].message.content
    assert last["nfe"] >= canvases[-1]["nfe"]


def test_stop_sequence_cuts_the_answer(client):
    full = chat(client, seed=5, max_tokens=CANVAS).choices[0].message.content
    assert len(full) >= 4
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = chat(client, seed=5, max_tokens=CANVAS, stop=[stop]).choices[0]
    assert cut.message.content == full[: full.find(stop)]
    assert cut.finish_reason == "stop"


def test_plain_completion_continues_text(client, tiny_tokenizer):
    prompt = "the red cat sat on"
    reply = client.completions.create(model="tiny-sft", prompt=prompt, max_tokens=3, seed=1)
    assert reply.object == "text_completion"
    assert reply.usage.prompt_tokens == len(tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert reply.usage.completion_tokens <= 3
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_max_tokens_beyond_the_canvas_adds_blocks():
    config, kept = fit_canvas(SamplerConfig(max_new_tokens=CANVAS), 20)
    assert (config.max_new_tokens, config.block_size, kept) == (24, CANVAS, 20)
    config, kept = fit_canvas(SamplerConfig(max_new_tokens=CANVAS), 3)
    assert (config.max_new_tokens, config.block_size, kept) == (CANVAS, None, 3)


def metric(base_url: str, name: str) -> float:
    text = httpx.get(base_url + "/metrics").text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)} (\S+)$", text, re.M))


def test_concurrent_requests_are_decoded_as_one_batch_and_a_seed_keeps_its_text(base_url, client):
    solo = chat(client, seed=21).choices[0].message.content
    batches_before = metric(base_url, "dgpt_batch_requests_count")
    single_before = metric(base_url, 'dgpt_batch_requests_bucket{le="1.0"}')
    aclient = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=KEY, max_retries=0, timeout=60)

    async def burst():
        unseeded = [aclient.chat.completions.create(model="m", messages=QUESTION) for _ in range(6)]
        seeded = aclient.chat.completions.create(model="m", messages=QUESTION, seed=21)
        return await asyncio.gather(seeded, *unseeded)

    seeded, *others = asyncio.run(burst())
    assert max(r.model_extra["batch_size"] for r in others) > 1
    assert seeded.model_extra["batch_size"] == 1 and seeded.choices[0].message.content == solo
    multi = (metric(base_url, "dgpt_batch_requests_count") - batches_before) - (
        metric(base_url, 'dgpt_batch_requests_bucket{le="1.0"}') - single_before)
    assert multi >= 1, "/metrics shows no batch of more than one request"
    assert metric(base_url, "dgpt_forward_passes_total") > 0


BAD_REQUESTS = {
    "n over the cap": ({"messages": QUESTION, "n": 3}, "n"),
    "max_tokens over the cap": ({"messages": QUESTION, "max_tokens": 41}, "max_tokens"),
    "prompt longer than the context": ({"messages": [{"role": "user", "content": "the red cat " * 30}]},
                                       "messages"),
    "unknown strategy": ({"messages": QUESTION, "sampler": {"strategy": "fastest"}}, "sampler.strategy"),
    "unknown sampler option": ({"messages": QUESTION, "sampler": {"warp": 9}}, "sampler.warp"),
    "no messages": ({"messages": []}, "messages"),
    "body over the size limit": ({"messages": [{"role": "user", "content": "x" * 30_000}]}, None),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_over_limit_or_invalid_request_gets_an_openai_400(base_url, client, name):
    body, param = BAD_REQUESTS[name]
    response = httpx.post(base_url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param
    extra = {"sampler": body["sampler"]} if "sampler" in body else {}
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=body["messages"], n=body.get("n"),
                                       max_tokens=body.get("max_tokens"), extra_body=extra)
    assert chat(client, max_tokens=2, seed=0).choices[0].message is not None  # still serving


def test_missing_or_wrong_api_key_gets_401(base_url):
    missing = httpx.post(base_url + "/v1/chat/completions", json={"messages": QUESTION})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(base_url + "/health").json()["status"] == "ok"


def test_page_and_metrics_are_served(base_url):
    page = httpx.get(base_url + "/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text + httpx.get(
        base_url + "/static/chat.js").text
    assert "dgpt_requests_total" in httpx.get(base_url + "/metrics").text


def test_cli_refuses_a_missing_folder_or_key_in_one_line(tmp_path, model_dir, monkeypatch, capsys):
    monkeypatch.delenv("DGPT_UNSET_KEY", raising=False)
    for argv in (["serve", str(tmp_path / "absent")], ["serve", str(model_dir), "--api-key-env", "DGPT_UNSET_KEY"]):
        assert run_command(build_parser(["serve"]).parse_args(argv)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[0].startswith("dgpt serve: ") and len(err) <= 2


def test_a_client_that_never_reads_its_events_does_not_hold_up_the_next_batch(model_dir):
    """The decode worker hands every update to the request's own queue without waiting for it: a
    job whose event loop is stalled (a client that reads nothing) gets all its live canvases
    queued, and the job after it is still decoded and answered."""
    from deploy.serve.batching import BatchDecoder, Canvas, DecodeJob, Finished
    from deploy.serve.metrics import ServerMetrics

    pipe = load_pipeline(str(model_dir), "cpu")
    decoder = BatchDecoder(pipe, ServeSettings(model_dir=str(model_dir), batch_window_ms=0.0), ServerMetrics())
    decoder.start()
    prompt = pipe.tokenizer("the red cat", add_special_tokens=False)["input_ids"]
    config = SamplerConfig(strategy="confidence", steps=CANVAS, max_new_tokens=CANVAS, seed=1)
    stalled_loop, live_loop = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        stalled = DecodeJob(prompt, config, 1, CANVAS, (), True, stalled_loop)
        decoder.submit(stalled)

        async def answered() -> Finished:
            job = DecodeJob(prompt, config, 1, CANVAS, (), False, asyncio.get_running_loop())
            decoder.submit(job)
            return await asyncio.wait_for(job.events.get(), timeout=60)

        assert isinstance(live_loop.run_until_complete(answered()), Finished)
        stalled_loop.run_until_complete(asyncio.sleep(0))  # now run the callbacks the worker queued
        events = [stalled.events.get_nowait() for _ in range(stalled.events.qsize())]
        assert sum(isinstance(e, Canvas) for e in events) >= 1 and isinstance(events[-1], Finished)
    finally:
        decoder.stop()
        stalled_loop.close()
        live_loop.close()


@pytest.fixture(scope="module")
def block_client(tiny_tokenizer, tmp_path_factory) -> Iterator[openai.OpenAI]:
    """The server on a random-weight block-causal folder (blocks of 4, up to 16 tokens, no stop
    token, so every answer has four blocks)."""
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_seq_len=64)
    model = build_model(cfg, tiny_tokenizer).eval()
    info = ModelInfo("sft", answer_canvas=16, answer_padding="eos", context_messages=4, block_size=4)
    defaults = {"strategy": "confidence", "steps": 4, "max_new_tokens": 16, "temperature": 1.0, "stop_token_ids": []}
    folder = save_model_folder(model, tiny_tokenizer, tmp_path_factory.mktemp("serve") / "tiny-blocks", defaults, info)
    for url in serving(folder):
        yield openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_a_block_model_streams_one_delta_per_finished_block(block_client, tiny_tokenizer):
    whole = block_client.chat.completions.create(model="tiny-blocks", messages=QUESTION, seed=3)
    deltas = [choice.delta.content for chunk in block_client.chat.completions.create(
        model="tiny-blocks", messages=QUESTION, seed=3, stream=True) for choice in chunk.choices
        if choice.delta.content]
    assert "".join(deltas) == whole.choices[0].message.content
    assert whole.usage.completion_tokens == 16 and 2 <= len(deltas) <= 4  # a block may add no text


def test_plain_completions_take_a_list_of_prompts(block_client):
    prompts = ["the red cat", "one two three four"]
    reply = block_client.completions.create(model="tiny-blocks", prompt=prompts, max_tokens=8, temperature=0)
    alone = [block_client.completions.create(model="tiny-blocks", prompt=p, max_tokens=8, temperature=0).choices[0].text
             for p in prompts]
    assert [choice.index for choice in reply.choices] == [0, 1]
    assert [choice.text for choice in reply.choices] == alone
    assert reply.usage.completion_tokens == 16
