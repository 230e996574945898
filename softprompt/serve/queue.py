"""The generation queue of `softprompt serve`: one generation runs at a time and up to
``size`` more wait their turn (any beyond: 503 at once); each has an abort flag (``abort``,
a client hanging up, the server closing) and keeps its text so far for KoboldCpp's
``/api/extra/generate/check``. ``collect`` and ``stream`` run one continuation for a route,
plain or as server-sent events."""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..generate import Progress
from ..http import Request, error, start_event_stream
from .request import GenRequest

log = logging.getLogger("softprompt.serve")


@dataclass
class Job:
    """A request ready to run: the token ids that fit, the soft tensor, the request, and the
    soft prompt's name (for the log)."""

    ids: list[int]
    soft: torch.Tensor
    req: GenRequest
    soft_prompt: str = ""


@dataclass
class Generation:
    """A generation: the client's genkey ("" when it sent none), its abort flag and its text
    so far."""

    genkey: str
    cancel: threading.Event = field(default_factory=threading.Event)
    text: list[str] = field(default_factory=list)


class GenerationQueue:
    """One generation at a time, ``size`` waiting. ``current`` is the running one, ``latest``
    the running one or else the last one; ``pending`` counts those running or waiting."""

    def __init__(self, size: int):
        self.size = size
        self._slots = threading.BoundedSemaphore(size + 1)
        self._run_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._closing = threading.Event()
        self.current: Generation | None = None
        self.latest: Generation | None = None
        self.pending = 0

    @contextmanager
    def slot(self, genkey: str = "") -> Iterator[Generation]:
        """Wait for the model; 503 when the queue is full or the server is stopping."""
        if self._closing.is_set() or not self._slots.acquire(blocking=False):
            raise error(503, "Server is busy; please try again later.", "service_unavailable")
        with self._count_lock:
            self.pending += 1
        try:
            with self._run_lock:
                if self._closing.is_set():
                    raise error(503, "The server is stopping.", "service_unavailable")
                gen = Generation(genkey)
                self.current = self.latest = gen
                try:
                    yield gen
                finally:
                    self.current = None
        finally:
            with self._count_lock:
                self.pending -= 1
            self._slots.release()

    def abort(self, genkey: str = "") -> bool:
        """Stop the running generation (only if its genkey matches, when one is given)."""
        gen = self.current
        if gen is None or (genkey and genkey != gen.genkey):
            return False
        gen.cancel.set()
        return True

    def text_so_far(self, genkey: str = "") -> str:
        """The text of the running generation, or of the last one, only for its own client:
        the genkey it was started with (KoboldCpp's rule: none matches one started without)."""
        gen = self.latest
        if gen is None or genkey != gen.genkey:
            return ""
        return "".join(gen.text)

    def busy(self) -> bool:
        return self.current is not None

    def close(self) -> None:
        """Refuse new generations and stop the running one."""
        self._closing.set()
        gen = self.current
        if gen is not None:
            gen.cancel.set()


def client_gone(sock: socket.socket) -> bool:
    """True when the client has closed the connection (or reset it). Data waiting to be read
    is a next request on the same connection, not a hang-up."""
    try:
        if not select.select([sock], [], [], 0)[0]:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class HangUp:
    """A generation's abort flag that also trips when the client of a non-streamed request
    hangs up, looked at between two tokens (a streamed request notices when a write fails)."""

    def __init__(self, cancel: threading.Event, sock: socket.socket):
        self.cancel, self.sock = cancel, sock

    def is_set(self) -> bool:
        if not self.cancel.is_set() and client_gone(self.sock):
            log.info("the client hung up: generation stopped")
            self.cancel.set()
        return self.cancel.is_set()


def collect(pieces: Iterator[str], gen: Generation, job: Job, progress: Progress):
    """``pieces`` of one continuation, kept as the generation's text so far; one log line
    when it ends."""
    gen.text.clear()
    start = time.perf_counter()
    try:
        for piece in pieces:
            if piece:
                gen.text.append(piece)
                yield piece
    finally:
        log.info(
            "generated %d tokens in %.1f s (%s%s), soft prompt: %s",
            progress.tokens,
            time.perf_counter() - start,
            progress.finish_reason,
            ", aborted" if progress.cancelled else "",
            job.soft_prompt or "none",
        )


def stream(
    request: Request,
    pieces: Generator[str, None, None],
    gen: Generation,
    progress: Progress,
    event: Callable[[str, str | None], str],
) -> None:
    """Send one continuation as an event stream: ``event(piece, None)`` for each piece, then
    ``event("", finish_reason)``. A client that hangs up stops the generation."""
    start_event_stream(request)
    try:
        for piece in pieces:
            request.wfile.write(event(piece, None).encode())
            request.wfile.flush()
        request.wfile.write(event("", progress.finish_reason).encode())
        request.wfile.flush()
    except OSError:  # the client hung up: stop generating
        gen.cancel.set()
    finally:
        pieces.close()
