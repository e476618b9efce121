"""The models behind the server. Their engines are stepped by `run_engines` in one thread and the
HTTP event loop runs in another, so the event loop never waits for a model. Requests cross over by
the engine's thread-safe `submit`; each step's tokens come back in one hand-over to the event loop,
which puts them on their requests' asyncio queues.

`pocketgpt serve` steps the engines in the process's main thread and runs the event loop beside it.
The other way round cost half the decoding speed: PyTorch's OpenMP work from a second thread, once
the main thread has had a team of OpenMP threads, ran an elementwise kernel in 50-85 us instead of
5-7 us here (SmolLM2 decoded at 30 tokens/s in a thread against 72-80 in the main thread)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from ..chat import ChatTemplate
from ..common import console
from ..engine import Engine, SamplingParams, Sequence
from ..model import GPT


@dataclass
class Stats:
    """What /metrics reports for one model."""
    requests: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.time)
    ttft: list[float] = field(default_factory=list)  # seconds from submit to first token, last 1000


class ModelWorker:
    def __init__(self, name: str, model: GPT, chat: ChatTemplate, meta: dict, max_batch: int = 32,
                 prefill_dtype: str = "float32", compile: bool = False, prefix_cache_mb: float = 0):
        self.name, self.model, self.chat, self.meta = name, model, chat, meta
        self.engine = Engine(model, chat.tokenizer, max_batch=max_batch, prefill_dtype=prefill_dtype, compile=compile,
                             prefix_cache_mb=prefix_cache_mb)
        if compile:
            with console.status(f"{name}: compiling the decode step (once per model and kind of batch)"):
                seconds = self.engine.warmup()
            console.print(f"{name}: decode step compiled in {seconds:.0f} s")
        self.stats = Stats()
        self.wake = threading.Event()  # set when a request arrives; run_engines shares one among its workers
        self._constraints = None
        self._loop_ref: asyncio.AbstractEventLoop | None = None
        self._queues: dict[int, tuple[asyncio.Queue, float]] = {}  # sequence id -> its request's queue
        self._started: set[int] = set()

    @property
    def constraints(self):
        """llguidance's view of this tokenizer is built on first use (about a second), then kept."""
        if self._constraints is None:
            from ..constrain import Constraints

            self._constraints = Constraints(self.chat, self.model.cfg.vocab_size)
        return self._constraints

    @property
    def running(self) -> int:
        return len(self.engine.running)

    @property
    def waiting(self) -> int:
        return len(self.engine.waiting) + self.engine.inbox.qsize()

    def step(self) -> bool:
        """One engine step, its tokens handed to the event loop; False when there was nothing to do."""
        if not self.engine.busy:
            return False
        try:
            events = self.engine.step()
        except Exception as e:  # a bug must not leave every client waiting forever: end their requests
            console.print(f"[red]engine error, {len(self.engine.running) + len(self.engine.waiting)} "
                          f"requests ended: {e!r}[/]")
            events = self.engine.abort_all()
        self._hand_over(events)
        return True

    def end_all(self) -> None:
        """End every request, finish_reason "error" (the server is stopping): each client gets its end at once,
        where streams waited for the HTTP server's shutdown to give up on them and were cut."""
        self._hand_over(self.engine.abort_all())

    def _hand_over(self, events) -> None:
        if events and self._loop_ref is not None:
            # One hand-over per step, not per token: each call wakes the event loop (a syscall).
            self._loop_ref.call_soon_threadsafe(self._dispatch, events)

    def _dispatch(self, events) -> None:
        """In the event loop: each (sequence, event) to its request's queue; time to first token noted."""
        now = time.time()
        for seq, ev in events:
            queue, t0 = self._queues.get(seq.id, (None, 0.0))
            if queue is None:
                continue
            if seq.id not in self._started:
                self._started.add(seq.id)
                self.stats.ttft = (self.stats.ttft + [now - t0])[-1000:]
            self.stats.tokens += ev.token >= 0
            queue.put_nowait((seq, ev))
            if ev.done:
                del self._queues[seq.id]
                self._started.discard(seq.id)

    def submit(self, prompt: list[int], params: SamplingParams, processor_factory=None) -> tuple[list[Sequence],
                                                                                                   asyncio.Queue]:
        """Queue n samples; their events arrive on the returned asyncio queue as (sequence, event)."""
        self._loop_ref = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        seqs = self.engine.sequences(prompt, params, processor_factory=processor_factory)
        t0 = time.time()
        for seq in seqs:
            self._queues[seq.id] = (events, t0)
        self.engine.enqueue(seqs)  # only now may the engine thread see them: their queues exist
        self.stats.requests += 1
        self.wake.set()
        return seqs, events


def run_engines(workers: list[ModelWorker], stop: threading.Event) -> None:
    """Step every worker's engine in turn until `stop` is set; sleep while none has work. Runs in the
    thread that calls it: `serve` calls it from the main thread (see the module's docstring)."""
    wake = threading.Event()
    for w in workers:
        w.wake = wake
    while not stop.is_set():
        wake.clear()  # before looking for work: a request arriving from here on ends the wait below
        busy = False
        for w in workers:
            busy = w.step() or busy
        if not busy:
            wake.wait(0.05)
