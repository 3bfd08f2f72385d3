"""Write a redrive worker in Python.

    import redrive_worker as rw

    def handle(msg: rw.Message) -> None:
        task = msg.json()
        if "prompt" not in task:
            raise rw.Poison("no prompt in the task", error_class="SchemaError")
        if rate_limited():
            raise rw.Retry("the model is busy", after=30)
        ...

    rw.run(handle, concurrency=4)

and run it with `redrive consume agent.tasks --worker 'python3 agent.py'`.

`run` speaks redrive's worker protocol (docs/worker-protocol.md) on stdin and stdout.
While it runs, `print()` and anything else written to standard output goes to standard
error (redrive's log), so only the protocol reaches redrive. A handler may be a plain
function (run in a thread pool of `concurrency` threads) or an `async def` (run on one
event loop, `concurrency` at a time). Returning means done; raising `Poison` sends the
message straight to the dead-letter queue; raising `Retry` (optionally with `after`
seconds) or any other exception sends it to its next retry tier.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, Awaitable, Callable, Dict, Optional, Union

__all__ = ["Message", "Poison", "Retry", "run", "PROTOCOL_VERSION"]

PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class Message:
    """One delivery of a message."""

    id: str
    """Stable across retries, crashes and replays: make handlers idempotent on it."""
    queue: str
    attempt: int
    """0 on the first delivery."""
    payload: bytes
    key: Optional[str] = None
    headers: Dict[str, str] = field(default_factory=dict)
    replays: int = 0

    @property
    def text(self) -> str:
        """The payload as UTF-8 text."""
        return self.payload.decode("utf-8")

    def json(self) -> Any:
        """The payload parsed as JSON."""
        return json.loads(self.payload)


class Poison(Exception):
    """The message can never succeed: it goes straight to the dead-letter queue."""

    def __init__(self, message: str = "", *, error_class: Optional[str] = None) -> None:
        super().__init__(message)
        self.error_class = error_class


class Retry(Exception):
    """A transient failure: the message goes to its next retry tier, and waits at
    least `after` seconds when given (a rate limiter's reset, an HTTP Retry-After)."""

    def __init__(
        self,
        message: str = "",
        *,
        after: Optional[float] = None,
        error_class: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.after = after
        self.error_class = error_class


Handler = Callable[[Message], Union[None, Awaitable[None]]]


def _message(line: Dict[str, Any]) -> Message:
    if "payload_base64" in line:
        payload = base64.b64decode(line["payload_base64"])
    else:
        payload = str(line.get("payload", "")).encode("utf-8")
    return Message(
        id=line["id"],
        queue=line.get("queue", ""),
        attempt=int(line.get("attempt", 0)),
        payload=payload,
        key=line.get("key"),
        headers=dict(line.get("headers") or {}),
        replays=int(line.get("replays", 0)),
    )


def _result(message_id: str, error: Optional[BaseException]) -> Dict[str, Any]:
    if error is None:
        return {"type": "result", "id": message_id, "outcome": "ok"}
    if isinstance(error, Poison):
        outcome, after = "poison", None
    elif isinstance(error, Retry):
        outcome, after = "retry", error.after
    else:
        outcome, after = "retry", None
    result: Dict[str, Any] = {
        "type": "result",
        "id": message_id,
        "outcome": outcome,
        "class": getattr(error, "error_class", None) or type(error).__name__,
        "message": str(error)[:4096],
    }
    if after is not None:
        result["retry_after"] = float(after)
    return result


class _Protocol:
    """Owns the real standard output; everything else written there goes to stderr."""

    def __init__(self, out: Optional[IO[str]] = None) -> None:
        if out is None:
            out = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
            sys.stdout.flush()
            os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
            sys.stdout = sys.stderr
        self._out = out
        self._lock = threading.Lock()

    def send(self, line: Dict[str, Any]) -> None:
        text = json.dumps(line, separators=(",", ":")) + "\n"
        with self._lock:
            self._out.write(text)
            self._out.flush()


def run(
    handler: Handler,
    *,
    concurrency: int = 1,
    stdin: Optional[IO[str]] = None,
    stdout: Optional[IO[str]] = None,
) -> None:
    """Serves deliveries from redrive until it closes standard input.

    `concurrency` is how many deliveries this process takes at once (redrive never
    sends more). `stdin` and `stdout` are for tests; by default the process's own.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    protocol = _Protocol(stdout)
    source = stdin if stdin is not None else sys.stdin
    protocol.send({"redrive_worker": PROTOCOL_VERSION, "concurrency": concurrency})
    if inspect.iscoroutinefunction(handler):
        asyncio.run(_serve_async(handler, concurrency, source, protocol))
    else:
        _serve_threads(handler, concurrency, source, protocol)


def _deliveries(source: IO[str]):
    for raw in source:
        raw = raw.strip()
        if not raw:
            continue
        try:
            line = json.loads(raw)
        except ValueError as e:
            print(f"redrive_worker: ignoring a line that is not JSON: {e}", file=sys.stderr)
            continue
        if line.get("type", "delivery") == "delivery":
            yield line


def _serve_threads(handler: Handler, concurrency: int, source: IO[str], protocol: _Protocol) -> None:
    def one(line: Dict[str, Any]) -> None:
        error: Optional[BaseException] = None
        try:
            handler(_message(line))
        except Exception as e:  # noqa: BLE001 - every failure is reported to redrive
            error = e
        protocol.send(_result(line["id"], error))

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for line in _deliveries(source):
            pool.submit(one, line)


async def _serve_async(handler: Handler, concurrency: int, source: IO[str], protocol: _Protocol) -> None:
    loop = asyncio.get_running_loop()
    tasks = set()

    async def one(line: Dict[str, Any]) -> None:
        error: Optional[BaseException] = None
        try:
            await handler(_message(line))  # type: ignore[misc]
        except Exception as e:  # noqa: BLE001 - every failure is reported to redrive
            error = e
        protocol.send(_result(line["id"], error))

    lines = _deliveries(source)
    while True:
        # Reading blocks, so it runs off the loop; handlers keep running meanwhile.
        line = await loop.run_in_executor(None, next, lines, None)
        if line is None:
            break
        task = asyncio.create_task(one(line))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
