"""The Python helper on its own: the handshake, results for each outcome, sync and
async handlers, payloads that are not text, and stdout kept for the protocol."""

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import redrive_worker as rw  # noqa: E402


def delivery(id_, payload, attempt=0, **extra):
    line = {"type": "delivery", "id": id_, "queue": "q", "attempt": attempt, "payload": payload}
    line.update(extra)
    return json.dumps(line, ensure_ascii=False) + "\n"  # as redrive writes it: UTF-8


def serve(handler, lines, concurrency=1):
    out = io.StringIO()
    rw.run(handler, concurrency=concurrency, stdin=io.StringIO("".join(lines)), stdout=out)
    return [json.loads(l) for l in out.getvalue().splitlines()]


def handler(msg):
    if msg.text == "bad":
        raise rw.Poison("no prompt", error_class="SchemaError")
    if msg.text == "busy":
        raise rw.Retry("rate limited", after=2.5)
    if msg.text == "boom":
        raise ValueError("unexpected")


class ResultsTest(unittest.TestCase):
    def test_handshake_then_one_result_per_delivery(self):
        lines = serve(handler, [delivery("a", "fine"), delivery("b", "bad"), delivery("c", "busy"), delivery("d", "boom")])
        self.assertEqual(lines[0], {"redrive_worker": 1, "concurrency": 1})
        by_id = {l["id"]: l for l in lines[1:]}
        self.assertEqual(by_id["a"]["outcome"], "ok")
        self.assertEqual((by_id["b"]["outcome"], by_id["b"]["class"], by_id["b"]["message"]), ("poison", "SchemaError", "no prompt"))
        self.assertEqual((by_id["c"]["outcome"], by_id["c"]["retry_after"]), ("retry", 2.5))
        self.assertEqual((by_id["d"]["outcome"], by_id["d"]["class"]), ("retry", "ValueError"))

    def test_model_tool_and_cost_go_with_a_failure(self):
        def agent(msg):
            msg.record(model="gpt-4o-mini", cost=rw.Cost(input_tokens=1000, output_tokens=200, usd=0.001))
            msg.record(tool="web_search", cost=rw.Cost(input_tokens=500, usd=0.0005))
            if msg.text == "fine":
                return
            if msg.text == "limit":
                raise rw.Retry("429", after=1, tool="summarize", cost=rw.Cost(output_tokens=1))
            raise KeyError("results")

        async def agent_async(msg):
            agent(msg)

        for h in (agent, agent_async):
            lines = serve(h, [delivery("a", "fine"), delivery("b", "limit"), delivery("c", "boom")])
            by_id = {l["id"]: l for l in lines[1:]}
            self.assertNotIn("cost", by_id["a"], "a success reports no cost")
            self.assertEqual(by_id["b"]["model"], "gpt-4o-mini")
            self.assertEqual(by_id["b"]["tool"], "summarize", "the exception's tool wins")
            self.assertEqual(by_id["b"]["cost"]["input_tokens"], 1500)
            self.assertEqual(by_id["b"]["cost"]["output_tokens"], 201)
            self.assertAlmostEqual(by_id["b"]["cost"]["usd"], 0.0015)
            self.assertEqual((by_id["c"]["class"], by_id["c"]["tool"]), ("KeyError", "web_search"))

    def test_nothing_recorded_adds_no_fields(self):
        lines = serve(handler, [delivery("b", "bad")])
        self.assertFalse({"model", "tool", "cost"} & set(lines[1]))

    def test_async_handlers_run_concurrently(self):
        running = []
        peak = []

        async def slow(msg):
            running.append(msg.id)
            peak.append(len(running))
            await asyncio.sleep(0.05)
            running.remove(msg.id)

        lines = serve(slow, [delivery(str(i), "x") for i in range(6)], concurrency=3)
        self.assertEqual(lines[0]["concurrency"], 3)
        self.assertEqual(sorted(l["id"] for l in lines[1:]), [str(i) for i in range(6)])
        self.assertTrue(all(l["outcome"] == "ok" for l in lines[1:]))
        self.assertGreater(max(peak), 1)

    def test_message_fields_and_binary_payloads(self):
        seen = []
        raw = bytes(range(256))
        serve(seen.append, [
            delivery("a", '{"n": 1}', attempt=2, key="k", headers={"x-tenant": "acme"}, replays=1),
            json.dumps({"type": "delivery", "id": "b", "queue": "q", "attempt": 0,
                        "payload_base64": base64.b64encode(raw).decode()}) + "\n",
        ])
        a, b = seen
        self.assertEqual((a.id, a.attempt, a.key, a.headers, a.replays, a.json()), ("a", 2, "k", {"x-tenant": "acme"}, 1, {"n": 1}))
        self.assertEqual(b.payload, raw)

    def test_print_in_a_handler_does_not_reach_the_protocol(self):
        script = textwrap.dedent(f"""
            import sys
            sys.path.insert(0, {os.path.join(os.path.dirname(__file__), "..", "src")!r})
            import redrive_worker as rw
            def handle(msg):
                print("a log line from the handler")
            rw.run(handle)
        """)
        done = subprocess.run([sys.executable, "-c", script], input=delivery("a", "x"),
                              capture_output=True, text=True, timeout=30, check=True)
        out = [json.loads(l) for l in done.stdout.splitlines()]
        self.assertEqual(out, [{"redrive_worker": 1, "concurrency": 1}, {"type": "result", "id": "a", "outcome": "ok"}])
        self.assertIn("a log line from the handler", done.stderr)


class PipeTest(unittest.TestCase):
    """Reading a real pipe: a read can end inside a line or inside a character."""

    def test_lines_split_across_reads_arrive_whole(self):
        r, w = os.pipe()
        line = delivery("a", "é" * 3).encode("utf-8")
        cut = line.index("é".encode("utf-8")) + 1  # inside the first é
        def write():
            for piece in (line[:cut], line[cut:] + delivery("b", "x" * 200_000).encode()):
                os.write(w, piece)
                time.sleep(0.05)
            os.close(w)
        writer = threading.Thread(target=write)
        writer.start()
        with os.fdopen(r, "r") as source:
            got = [line for batch in rw._deliveries(source) for line in batch]
        writer.join()
        self.assertEqual([(l["id"], len(l["payload"])) for l in got], [("a", 3), ("b", 200_000)])
        self.assertEqual(got[0]["payload"], "ééé")

    def test_many_deliveries_through_a_worker_process(self):
        for kind in ("def", "async def"):
            with self.subTest(kind=kind):
                script = textwrap.dedent(f"""
                    import sys
                    sys.path.insert(0, {os.path.join(os.path.dirname(__file__), "..", "src")!r})
                    import redrive_worker as rw
                    {kind} handle(msg):
                        if msg.text != "ü" * int(msg.headers["n"]):
                            raise rw.Poison("payload changed in transit")
                    rw.run(handle, concurrency=8)
                """)
                lines = [delivery(str(i), "ü" * (i * 331), headers={"n": str(i * 331)}) for i in range(300)]
                done = subprocess.run([sys.executable, "-c", script], input="".join(lines),
                                      capture_output=True, encoding="utf-8", timeout=60, check=True)
                out = [json.loads(l) for l in done.stdout.splitlines()]
                self.assertEqual(out[0], {"redrive_worker": 1, "concurrency": 8})
                self.assertEqual(sorted(o["id"] for o in out[1:]), sorted(str(i) for i in range(300)))
                self.assertEqual({o["outcome"] for o in out[1:]}, {"ok"}, done.stderr)


if __name__ == "__main__":
    unittest.main()
