"""One model behind the server: its engine runs in a thread of its own, so the event loop never
waits for the model. Requests cross over by the engine's thread-safe `submit`; each step's tokens
come back in one hand-over to the event loop, which puts them on their requests' asyncio queues."""

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
                 prefill_dtype: str = "float32", compile: bool = False):
        self.name, self.model, self.chat, self.meta = name, model, chat, meta
        self.engine = Engine(model, chat.tokenizer, max_batch=max_batch, prefill_dtype=prefill_dtype, compile=compile)
        if compile:
            with console.status(f"{name}: compiling the decode step (once per model and kind of batch)"):
                seconds = self.engine.warmup()
            console.print(f"{name}: decode step compiled in {seconds:.0f} s")
        self.stats = Stats()
        self._wake = threading.Event()
        self._stop = False
        self._constraints = None
        self._loop_ref: asyncio.AbstractEventLoop | None = None
        self._queues: dict[int, tuple[asyncio.Queue, float]] = {}  # sequence id -> its request's queue
        self._started: set[int] = set()
        self.thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self.thread.start()

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

    def _loop(self) -> None:
        while not self._stop:
            if not self.engine.busy:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # a bug must not leave every client waiting forever: end their requests
                console.print(f"[red]engine error, {len(self.engine.running) + len(self.engine.waiting)} "
                              f"requests ended: {e!r}[/]")
                events = self.engine.abort_all()
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

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self.thread.join(timeout=5)

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
        self._wake.set()
        return seqs, events
