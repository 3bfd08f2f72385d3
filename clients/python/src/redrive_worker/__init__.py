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
function (run on `concurrency` threads) or an `async def` (run on one
event loop, `concurrency` at a time). Returning means done; raising `Poison` sends the
message straight to the dead-letter queue; raising `Retry` (optionally with `after`
seconds) or any other exception sends it to its next retry tier.

What an attempt used can go with its failure, so triage can show which model or tool
failed and what failed attempts cost: call `msg.record(model=..., tool=..., cost=...)`
as the handler goes (costs add up; the last model and tool named win), or pass the same
keywords to `Poison` and `Retry`:

        reply = client.messages.create(...)
        msg.record(model="claude-sonnet-4", cost=rw.Cost(
            input_tokens=reply.usage.input_tokens, output_tokens=reply.usage.output_tokens,
            usd=price(reply.usage)))
        msg.record(tool="web_search")
        results = search(...)          # raises: the failure carries all of the above
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import os
import queue
import sys
import threading
import traceback
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from dataclasses import dataclass, field
from typing import IO, Any, Awaitable, Callable, Dict, Iterator, List, Optional, Set, Union

__all__ = ["Cost", "Message", "Poison", "Retry", "run", "PROTOCOL_VERSION"]

PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class Cost:
    """What an attempt cost: model tokens and US dollars."""

    input_tokens: int = 0
    output_tokens: int = 0
    usd: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.usd + other.usd,
        )

    def _wire(self) -> Dict[str, Any]:
        return {"input_tokens": int(self.input_tokens), "output_tokens": int(self.output_tokens), "usd": float(self.usd)}


class _Agent:
    """The model, tool and cost recorded so far by one attempt."""

    __slots__ = ("model", "tool", "cost")

    def __init__(self) -> None:
        self.model: Optional[str] = None
        self.tool: Optional[str] = None
        self.cost: Optional[Cost] = None

    def record(self, model: Optional[str], tool: Optional[str], cost: Optional[Cost]) -> None:
        if model is not None:
            self.model = model
        if tool is not None:
            self.tool = tool
        if cost is not None:
            self.cost = cost if self.cost is None else self.cost + cost


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
    _agent: _Agent = field(default_factory=_Agent, repr=False, compare=False)

    def record(
        self,
        *,
        model: Optional[str] = None,
        tool: Optional[str] = None,
        cost: Optional[Cost] = None,
    ) -> None:
        """Notes what this attempt used: if it fails, redrive keeps it with the failure
        (shown per attempt in triage and summed per error group). Costs add up; the last
        model and tool named win."""
        self._agent.record(model, tool, cost)

    @property
    def text(self) -> str:
        """The payload as UTF-8 text."""
        return self.payload.decode("utf-8")

    def json(self) -> Any:
        """The payload parsed as JSON."""
        return json.loads(self.payload)


class _Failure(Exception):
    """What `Poison` and `Retry` share: an error class, and the model, tool and cost
    as for `Message.record`."""

    def __init__(
        self,
        message: str = "",
        *,
        error_class: Optional[str] = None,
        model: Optional[str] = None,
        tool: Optional[str] = None,
        cost: Optional[Cost] = None,
    ) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.model, self.tool, self.cost = model, tool, cost


class Poison(_Failure):
    """The message can never succeed: it goes straight to the dead-letter queue.
    `model`, `tool` and `cost` as for `Message.record`."""


class Retry(_Failure):
    """A transient failure: the message goes to its next retry tier, and waits at
    least `after` seconds when given (a rate limiter's reset, an HTTP Retry-After)."""

    def __init__(
        self,
        message: str = "",
        *,
        after: Optional[float] = None,
        error_class: Optional[str] = None,
        model: Optional[str] = None,
        tool: Optional[str] = None,
        cost: Optional[Cost] = None,
    ) -> None:
        super().__init__(message, error_class=error_class, model=model, tool=tool, cost=cost)
        self.after = after


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


_encode = json.JSONEncoder(separators=(",", ":")).encode


def _result(
    message_id: str, error: Optional[BaseException], agent: Optional[_Agent] = None
) -> Union[str, Dict[str, Any]]:
    if error is None:
        # The common answer, written without building a dict to encode.
        return '{"type":"result","id":%s,"outcome":"ok"}\n' % encode_basestring_ascii(message_id)
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
    agent = agent or _Agent()
    agent.record(getattr(error, "model", None), getattr(error, "tool", None), getattr(error, "cost", None))
    if agent.model is not None:
        result["model"] = str(agent.model)
    if agent.tool is not None:
        result["tool"] = str(agent.tool)
    if agent.cost is not None:
        result["cost"] = agent.cost._wire()
    return result


class _Protocol:
    """Owns the real standard output; everything else written there goes to stderr.

    Results leave in batches: what finishes while one write is going out leaves in the
    next, so a busy worker makes one system call for many results and an idle one
    answers at once.
    """

    def __init__(self, out: Optional[IO[str]] = None) -> None:
        if out is None:
            out = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
            sys.stdout.flush()
            os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
            sys.stdout = sys.stderr
        self._out = out
        self._lock = threading.Lock()
        self._waiting: List[str] = []
        self._writing = False

    def send(self, *lines: Union[str, Dict[str, Any]]) -> None:
        """Sends result lines: dicts, or text already encoded (a success)."""
        text = "".join(line if isinstance(line, str) else _encode(line) + "\n" for line in lines)
        with self._lock:
            self._waiting.append(text)
            if self._writing:
                return  # The thread writing now takes this line with its next batch.
            self._writing = True
        try:
            while True:
                with self._lock:
                    batch, self._waiting = self._waiting, []
                    if not batch:
                        # Under the lock that senders check: none is left waiting.
                        self._writing = False
                        return
                self._out.write("".join(batch))
                self._out.flush()
        except BaseException:
            with self._lock:
                self._writing = False
            raise


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


def _deliveries(source: IO[str]) -> Iterator[List[Dict[str, Any]]]:
    """The deliveries read from `source`, a batch per read: as many as have arrived."""
    fd = _fileno(source)
    if fd is None:
        chunks: Iterator[bytes] = iter([source.read().encode("utf-8")])
    else:
        chunks = iter(lambda: os.read(fd, 1 << 16), b"")
    rest = bytearray()
    for chunk in chunks:
        # Cut at the last newline only: a read can end inside a line, or inside a
        # character's UTF-8 bytes.
        cut = chunk.rfind(b"\n") + 1
        rest += chunk[:cut] if cut else chunk
        if not cut:
            continue
        complete = rest.decode("utf-8", "replace").split("\n")
        rest = bytearray(chunk[cut:])
        batch = [line for line in map(_parse, complete) if line is not None]
        if batch:
            yield batch
    last = _parse(rest.decode("utf-8", "replace"))
    if last is not None:
        yield [last]


def _fileno(source: IO[str]) -> Optional[int]:
    try:
        return source.fileno()
    except (AttributeError, OSError, ValueError):
        return None  # An in-memory stream (tests).


def _parse(raw: str) -> Optional[Dict[str, Any]]:
    if not raw or raw.isspace():
        return None
    try:
        line = json.loads(raw)
    except ValueError as e:
        print(f"redrive_worker: ignoring a line that is not JSON: {e}", file=sys.stderr)
        return None
    if not isinstance(line, dict) or line.get("type", "delivery") != "delivery":
        return None
    return line


def _answer(line: Dict[str, Any], handler: Handler, protocol: _Protocol) -> None:
    error: Optional[BaseException] = None
    msg = _message(line)
    try:
        handler(msg)
    except Exception as e:  # noqa: BLE001 - every failure is reported to redrive
        error = e
    protocol.send(_result(line["id"], error, msg._agent))


def _serve_threads(handler: Handler, concurrency: int, source: IO[str], protocol: _Protocol) -> None:
    if concurrency == 1:
        # redrive sends one delivery at a time: answer it on this thread.
        for batch in _deliveries(source):
            for line in batch:
                _answer(line, handler, protocol)
        return
    work: "queue.SimpleQueue[Optional[Dict[str, Any]]]" = queue.SimpleQueue()

    def serve() -> None:
        while (line := work.get()) is not None:
            try:
                _answer(line, handler, protocol)
            except Exception:  # noqa: BLE001 - a bad line must not stop this thread
                traceback.print_exc()

    threads = [threading.Thread(target=serve, name=f"redrive-worker-{i}", daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    for batch in _deliveries(source):
        for line in batch:
            work.put(line)
    for _ in threads:
        work.put(None)
    for t in threads:
        t.join()


async def _serve_async(handler: Handler, concurrency: int, source: IO[str], protocol: _Protocol) -> None:
    loop = asyncio.get_running_loop()
    tasks: Set["asyncio.Task[None]"] = set()
    # Results finished in one turn of the loop leave in one write, at the end of it.
    results: List[Dict[str, Any]] = []

    def flush() -> None:
        if results:
            protocol.send(*results)
            results.clear()

    async def one(line: Dict[str, Any]) -> None:
        error: Optional[BaseException] = None
        msg = _message(line)
        try:
            await handler(msg)  # type: ignore[misc]
        except Exception as e:  # noqa: BLE001 - every failure is reported to redrive
            error = e
        results.append(_result(line["id"], error, msg._agent))
        if len(results) == 1:
            loop.call_soon(flush)

    batches = _deliveries(source)
    while True:
        # Reading blocks, so it runs off the loop (a hop per read, not per line);
        # handlers keep running meanwhile.
        batch = await loop.run_in_executor(None, next, batches, None)
        if batch is None:
            break
        for line in batch:
            task = asyncio.create_task(one(line))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    flush()
