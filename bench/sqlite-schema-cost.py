#!/usr/bin/env python3
"""What redrive's table costs SQLite by itself, before any of redrive's code runs.

The plain queue lifecycle of `redrive bench` (insert in batches, claim a batch with one
`UPDATE ... RETURNING`, delete it in another transaction; WAL, synchronous=FULL), run
twice on scratch files, side by side:

  plain    a table of (id, payload, leased_until), as a team would write by hand;
  redrive  the embedded store's `messages` table and its per-lane due-time index, with
           headers beside each payload, the due rows selected and then leased by
           sequence, and each deleted by sequence and lease id, as redrive does.

Same loop, same batch size, one thread, no retries: the ratio is the schema's share of
the gap between `redrive bench` and the plain lifecycle.

  bench/sqlite-schema-cost.py            # batches of 100 (the bench's plain lifecycle)
  bench/sqlite-schema-cost.py 20         # batches of 20 (what one of redrive's commits
                                         # holds with 50 handlers)
"""

import json
import os
import sqlite3
import sys
import tempfile
import time

MESSAGES = 50_000


def lifecycle(schema: str, batch: int) -> float:
    path = os.path.join(tempfile.mkdtemp(prefix="redrive-schema-"), "q.db")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    if schema == "plain":
        db.execute(
            "CREATE TABLE q (id INTEGER PRIMARY KEY, payload BLOB NOT NULL,"
            " leased_until INTEGER NOT NULL DEFAULT 0)"
        )
    else:
        db.execute(
            """CREATE TABLE messages (
                 seq INTEGER PRIMARY KEY, queue TEXT NOT NULL, lane TEXT NOT NULL,
                 due_ms INTEGER NOT NULL, leased INTEGER NOT NULL DEFAULT 0,
                 lease_id INTEGER NOT NULL DEFAULT 0, published_ms INTEGER NOT NULL,
                 key TEXT, payload BLOB NOT NULL, headers TEXT NOT NULL)"""
        )
        db.execute("CREATE INDEX messages_lane_due ON messages (queue, lane, due_ms)")
    headers = json.dumps(
        [["redrive-id", "0193a4c2-7b1e-7d3a-9f00-1c2d3e4f5a6b"], ["redrive-attempt", "0"]]
    )
    start = time.time()
    now = int(start * 1000)
    for first in range(0, MESSAGES, batch):
        db.execute("BEGIN")
        for i in range(first, min(MESSAGES, first + batch)):
            payload = b'{"n":%d}' % i
            if schema == "plain":
                db.execute("INSERT INTO q (payload) VALUES (?)", (payload,))
            else:
                db.execute(
                    "INSERT INTO messages (queue, lane, due_ms, published_ms, payload, headers)"
                    " VALUES ('bench', 'main', ?, ?, ?, ?)",
                    (now, now, payload, headers),
                )
        db.execute("COMMIT")
    consumed = 0
    while True:
        now = int(time.time() * 1000)
        db.execute("BEGIN IMMEDIATE")
        if schema == "plain":
            claimed = db.execute(
                "UPDATE q SET leased_until = ? WHERE id IN"
                " (SELECT id FROM q WHERE leased_until < ? ORDER BY id LIMIT ?)"
                " RETURNING id, payload",
                (now + 30_000, now, batch),
            ).fetchall()
        else:
            due = db.execute(
                "SELECT seq, lane, due_ms, leased, published_ms, key, payload, headers"
                " FROM messages WHERE queue = 'bench' AND lane = 'main' AND due_ms <= ?"
                " ORDER BY due_ms, seq LIMIT ?",
                (now, batch),
            ).fetchall()
            claimed = (
                db.execute(
                    "UPDATE messages SET due_ms = ?, leased = 1, lease_id = lease_id + 1"
                    " WHERE seq IN (SELECT value FROM json_each(?)) RETURNING seq, lease_id",
                    (now + 30_000, json.dumps([row[0] for row in due])),
                ).fetchall()
                if due
                else []
            )
        db.execute("COMMIT")
        if not claimed:
            break
        consumed += len(claimed)
        db.execute("BEGIN")
        for row in claimed:
            if schema == "plain":
                db.execute("DELETE FROM q WHERE id = ?", (row[0],))
            else:
                db.execute("DELETE FROM messages WHERE seq = ? AND lease_id = ?", row)
        db.execute("COMMIT")
    assert consumed == MESSAGES, f"consumed {consumed} of {MESSAGES}"
    return MESSAGES / (time.time() - start)


def main() -> None:
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    for _ in range(2):
        plain = lifecycle("plain", batch)
        redrive = lifecycle("redrive", batch)
        print(
            f"batches of {batch}: plain table {plain:,.0f} msgs/s, redrive's table"
            f" {redrive:,.0f} msgs/s, ratio {redrive / plain:.2f}"
        )


if __name__ == "__main__":
    main()
