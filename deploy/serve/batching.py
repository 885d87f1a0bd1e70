"""The decode worker: requests that arrive together are decoded together.

One worker thread owns the model. Requests queue in its inbox; the worker takes the oldest one,
waits at most `batch_window_ms` (from that request's arrival) for others with the same sampler
settings, and decodes up to `max_batch_size` sequences as one batch with `sampling.stream`.
Requests with other settings wait for the next batch. A request with an explicit `seed` is decoded
on its own batch: the sampler draws every random number of a batch from one generator, so sharing
it would make the text depend on the other requests (and differ between streamed and not).

The worker never waits on a client: every update goes into the request's own asyncio queue
(unbounded; at most one canvas per denoising step), read by the HTTP handler at the client's pace.
When a block of a semi-autoregressive or block-causal decode is finished, each choice's new text
(what that block added, cut at stop tokens and strings) is sent as a `Delta`, so a streamed answer
arrives block by block.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from dgpt_core.generation.pipeline import TextDiffusionPipeline, render
from dgpt_core.generation.sampler import SamplerConfig, cut_at_stop, stream

from .metrics import ServerMetrics
from .settings import ServeSettings

log = logging.getLogger(__name__)


@dataclass
class Canvas:
    """The canvas after a denoising step, per choice of the request (masks as MASK_SYMBOL)."""

    step: int
    nfe: int
    texts: list[str]


@dataclass
class Answer:
    """One finished choice."""

    text: str
    finish_reason: str
    """"stop" (a stop token or stop string ended it) or "length" (max_tokens or the canvas did)."""
    completion_tokens: int


@dataclass
class Finished:
    """The request's answers, and how its batch went."""

    answers: list[Answer]
    nfe: int
    batch_sequences: int


@dataclass
class Failed:
    """The batch failed; `message` is one line."""

    message: str


@dataclass
class Delta:
    """The text each choice of the request gained with the block just finished ("" where none)."""

    texts: list[str]


Event = Canvas | Delta | Finished | Failed


@dataclass(eq=False)
class DecodeJob:
    """One API request as the worker sees it."""

    prompts: list[list[int]]
    """Token ids of each prompt; every prompt is answered `n` times (choice p * n + i)."""
    config: SamplerConfig
    n: int
    answer_limit: int
    """Tokens kept per answer (max_tokens, or the canvas)."""
    stop: tuple[str, ...]
    live: bool
    """Send a Canvas event after every denoising step."""
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    """Set by the handler when the client went away: the job is dropped if not yet decoding."""

    @property
    def rows(self) -> int:
        """Sequences this job decodes (its choices)."""
        return len(self.prompts) * self.n

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def batch_key(self) -> Hashable:
        """Jobs with equal keys may share a batch: same sampler settings, and no explicit seed."""
        return ("alone", id(self)) if self.config.seed is not None else self.config

    def send(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


class BatchDecoder:
    """The worker thread that collects jobs into batches and decodes them."""

    def __init__(self, pipe: TextDiffusionPipeline, settings: ServeSettings, metrics: ServerMetrics) -> None:
        self.pipe, self.settings, self.metrics = pipe, settings, metrics
        self._inbox: queue.Queue[DecodeJob | None] = queue.Queue()
        self._pending: list[DecodeJob] = []
        self._thread = threading.Thread(target=self._run, name="dgpt-decode", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=60)

    def submit(self, job: DecodeJob) -> None:
        self.metrics.queued.inc()
        self._inbox.put(job)

    def _run(self) -> None:
        while True:
            group = self._collect()
            if group is None:
                return
            self.metrics.queued.dec(len(group))
            group = [job for job in group if not job.cancelled]
            if group:
                self._decode(group)

    def _collect(self) -> list[DecodeJob] | None:
        """The next batch: the oldest job and the jobs with its key, up to max_batch_size
        sequences, after waiting out the collection window; None when the server stops."""
        if not self._pending:
            job = self._inbox.get()
            if job is None:
                return None
            self._pending.append(job)
        # the jobs that queued while the last batch decoded join at once, whatever their age
        while True:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return None
            self._pending.append(job)
        # a seeded job decodes alone: nothing can join it, so it does not wait out the window
        window = self.settings.batch_window_ms / 1000 if self._pending[0].config.seed is None else 0
        key = self._pending[0].batch_key
        while window and sum(j.rows for j in self._pending if j.batch_key == key) < self.settings.max_batch_size:
            left = self._pending[0].arrived + window - time.monotonic()
            if left <= 0:
                break
            try:
                job = self._inbox.get(timeout=left)
            except queue.Empty:
                break
            if job is None:
                return None
            self._pending.append(job)
        group, rows = [], 0
        for job in list(self._pending):
            if job.batch_key == key and (not group or rows + job.rows <= self.settings.max_batch_size):
                group.append(job)
                rows += job.rows
                self._pending.remove(job)
        return group

    def _decode(self, group: list[DecodeJob]) -> None:
        prompts = [prompt for job in group for prompt in job.prompts for _ in range(job.n)]
        config = group[0].config
        start = time.perf_counter()
        try:
            state = previous = None
            sent = [[""] * job.rows for job in group]
            for state in stream(self.pipe.model, prompts, self.pipe.token_ids, config):
                if previous is not None and state.block != previous.block:  # the previous block is final
                    self._send_deltas(group, previous.canvas, config, sent)
                if not state.done:
                    self._send_canvases(group, state.canvas, state.step, state.nfe, config)
                previous = state
            assert state is not None
            answers = self._answers(group, state.canvas, config)
        except Exception as err:  # one failed batch must not stop the server
            log.exception("decoding a batch of %d sequences failed", len(prompts))
            message = " ".join(f"{type(err).__name__}: {err}".split())
            for job in group:
                job.send(Failed(message))
            return
        seconds = time.perf_counter() - start
        tokens = sum(a.completion_tokens for job_answers in answers for a in job_answers)
        self.metrics.count_batch(len(prompts), len(group), state.nfe, tokens, seconds)
        for job, job_answers in zip(group, answers):
            job.send(Finished(job_answers, state.nfe, len(prompts)))

    def _send_deltas(self, group: list[DecodeJob], finished: torch.Tensor, config: SamplerConfig,
                     sent: list[list[str]]) -> None:
        """A Delta to every job of the group: per choice, the text of its finished blocks beyond what
        it was sent (`sent`, brought up to date); nothing where that text does not extend it."""
        ids_per_row, _ = cut_at_stop(finished, config.stop_ids(self.pipe.token_ids))
        row = 0
        for job, job_sent in zip(group, sent):
            texts = []
            for i, ids in enumerate(ids_per_row[row : row + job.rows]):
                text = self._answer(ids, False, job).text
                grown = text.startswith(job_sent[i]) and len(text) > len(job_sent[i])
                texts.append(text[len(job_sent[i]):] if grown else "")
                job_sent[i] = text if grown else job_sent[i]
            if any(texts):
                job.send(Delta(texts))
            row += job.rows

    def _send_canvases(self, group: list[DecodeJob], canvas: torch.Tensor, step: int, nfe: int,
                       config: SamplerConfig) -> None:
        """A Canvas event to every live job of the group: its rows of `canvas`, rendered."""
        if not any(job.live for job in group):
            return
        tok, ids = self.pipe.tokenizer, self.pipe.token_ids
        stops, rows, row = config.stop_ids(ids), canvas.tolist(), 0
        for job in group:
            if job.live:
                texts = [render(tok, r[: job.answer_limit], ids.mask, stops) for r in rows[row : row + job.rows]]
                job.send(Canvas(step, nfe, texts))
            row += job.rows

    def _answers(self, group: list[DecodeJob], canvas: torch.Tensor, config: SamplerConfig) -> list[list[Answer]]:
        """Per job, its answers: cut at the first stop token, at `answer_limit` tokens, then before
        the first stop string."""
        ids_per_row, stopped = cut_at_stop(canvas, config.stop_ids(self.pipe.token_ids))
        out, row = [], 0
        for job in group:
            answers = []
            for ids, hit_stop in zip(ids_per_row[row : row + job.rows], stopped[row : row + job.rows]):
                answers.append(self._answer(ids, hit_stop, job))
            out.append(answers)
            row += job.rows
        return out

    def _answer(self, ids: list[int], hit_stop: bool, job: DecodeJob) -> Answer:
        cut = len(ids) > job.answer_limit
        ids = ids[: job.answer_limit]
        text = self.pipe.tokenizer.decode(ids, skip_special_tokens=True)
        reason = "stop" if hit_stop and not cut else "length"
        ends = [i for i in (text.find(s) for s in job.stop) if i >= 0]
        if ends:
            text, reason = text[: min(ends)], "stop"
            count = len(self.pipe.tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            count = len(ids)
        return Answer(text, reason, count)
