"""One model behind the server: its engine runs in a thread of its own, so the event loop never
waits for the model. Requests cross over by the engine's thread-safe `submit`; tokens come back
through a callback that hands them to the request's asyncio queue."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from ..chat import ChatTemplate
from ..engine import Engine, SamplingParams, Sequence, TokenEvent
from ..model import GPT


@dataclass
class Stats:
    """What /metrics reports for one model."""
    requests: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.time)
    ttft: list[float] = field(default_factory=list)  # seconds from submit to first token, last 1000


class ModelWorker:
    def __init__(self, name: str, model: GPT, chat: ChatTemplate, meta: dict, max_batch: int = 32):
        self.name, self.model, self.chat, self.meta = name, model, chat, meta
        self.engine = Engine(model, chat.tokenizer, max_batch=max_batch)
        self.stats = Stats()
        self._wake = threading.Event()
        self._stop = False
        self._constraints = None
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
            if self.engine.busy:
                self.engine.step()
            else:
                self._wake.wait(0.05)
                self._wake.clear()

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self.thread.join(timeout=5)

    def submit(self, prompt: list[int], params: SamplingParams, processor_factory=None) -> tuple[list[Sequence],
                                                                                                   asyncio.Queue]:
        """Queue n samples; their events arrive on the returned asyncio queue as (sequence, event)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        t0 = time.time()
        first: set[int] = set()

        def on_event(seq: Sequence, ev: TokenEvent) -> None:  # runs in the engine's thread
            if seq.id not in first:
                first.add(seq.id)
                self.stats.ttft = (self.stats.ttft + [time.time() - t0])[-1000:]
            self.stats.tokens += ev.token >= 0
            loop.call_soon_threadsafe(events.put_nowait, (seq, ev))

        seqs = self.engine.submit(prompt, params, on_event=on_event, processor_factory=processor_factory)
        self.stats.requests += 1
        self._wake.set()
        return seqs, events
