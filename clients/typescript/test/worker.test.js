// The TypeScript/JavaScript helper on its own: the handshake, results for each outcome,
// concurrency, binary payloads, and stdout kept for the protocol.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Readable } from 'node:stream';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { run, Poison, Retry } from '../index.js';

const delivery = (id, payload, extra = {}) =>
  `${JSON.stringify({ type: 'delivery', id, queue: 'q', attempt: 0, payload, ...extra })}\n`;

async function serve(handler, lines, concurrency = 1) {
  let written = '';
  await run(handler, {
    concurrency,
    input: Readable.from(lines.join('')),
    output: { write: (s) => { written += s; } },
  });
  return written.trim().split('\n').map((l) => JSON.parse(l));
}

const handler = (msg) => {
  if (msg.text === 'bad') throw new Poison('no prompt', { errorClass: 'SchemaError' });
  if (msg.text === 'busy') throw new Retry('rate limited', { after: 2.5 });
  if (msg.text === 'boom') throw new TypeError('unexpected');
};

test('a handshake, then one result per delivery', async () => {
  const [hello, ...results] = await serve(handler, [
    delivery('a', 'fine'), delivery('b', 'bad'), delivery('c', 'busy'), delivery('d', 'boom'),
  ]);
  assert.deepEqual(hello, { redrive_worker: 1, concurrency: 1 });
  const by = Object.fromEntries(results.map((r) => [r.id, r]));
  assert.equal(by.a.outcome, 'ok');
  assert.deepEqual([by.b.outcome, by.b.class, by.b.message], ['poison', 'SchemaError', 'no prompt']);
  assert.deepEqual([by.c.outcome, by.c.retry_after], ['retry', 2.5]);
  assert.deepEqual([by.d.outcome, by.d.class], ['retry', 'TypeError']);
});

test('model, tool and cost go with a failure, and only then', async () => {
  const agent = async (msg) => {
    msg.record({ model: 'gpt-4o-mini', cost: { inputTokens: 1000, outputTokens: 200, usd: 0.001 } });
    msg.record({ tool: 'web_search', cost: { inputTokens: 500, usd: 0.0005 } });
    if (msg.text === 'fine') return;
    if (msg.text === 'limit') throw new Retry('429', { after: 1, tool: 'summarize', cost: { outputTokens: 1 } });
    throw new RangeError('results');
  };
  const [, ...results] = await serve(agent, [delivery('a', 'fine'), delivery('b', 'limit'), delivery('c', 'boom')]);
  const by = Object.fromEntries(results.map((r) => [r.id, r]));
  assert.equal(by.a.cost, undefined, 'a success reports no cost');
  assert.deepEqual([by.b.model, by.b.tool], ['gpt-4o-mini', 'summarize']);
  assert.deepEqual([by.b.cost.input_tokens, by.b.cost.output_tokens], [1500, 201]);
  assert.ok(Math.abs(by.b.cost.usd - 0.0015) < 1e-12);
  assert.deepEqual([by.c.class, by.c.tool], ['RangeError', 'web_search']);
  const [, plain] = await serve(handler, [delivery('x', 'bad')]);
  assert.deepEqual(['model', 'tool', 'cost'].filter((f) => f in plain), []);
});

test('async handlers run side by side', async () => {
  let running = 0;
  let peak = 0;
  const slow = async () => {
    running += 1;
    peak = Math.max(peak, running);
    await new Promise((r) => setTimeout(r, 30));
    running -= 1;
  };
  const [, ...results] = await serve(slow, [0, 1, 2, 3].map((i) => delivery(String(i), 'x')), 4);
  assert.equal(results.length, 4);
  assert.ok(results.every((r) => r.outcome === 'ok'));
  assert.ok(peak > 1, `peak ${peak}`);
});

test('message fields and binary payloads', async () => {
  const seen = [];
  const raw = Buffer.from([...Array(256).keys()]);
  await serve((m) => { seen.push(m); }, [
    delivery('a', '{"n":1}', { attempt: 2, key: 'k', headers: { 'x-tenant': 'acme' }, replays: 1 }),
    `${JSON.stringify({ type: 'delivery', id: 'b', queue: 'q', attempt: 0, payload_base64: raw.toString('base64') })}\n`,
  ]);
  assert.deepEqual([seen[0].attempt, seen[0].key, seen[0].headers, seen[0].replays, seen[0].json()],
    [2, 'k', { 'x-tenant': 'acme' }, 1, { n: 1 }]);
  assert.deepEqual(seen[1].payload, raw);
});

test('console output in a handler does not reach the protocol', () => {
  const helper = fileURLToPath(new URL('../index.js', import.meta.url));
  const script = `import { run } from ${JSON.stringify(helper)};
    await run(() => { console.log('a log line from the handler'); });`;
  const done = spawnSync(process.execPath, ['--input-type=module', '-e', script], {
    input: delivery('a', 'x'), encoding: 'utf8', timeout: 30_000,
  });
  assert.equal(done.status, 0, done.stderr);
  assert.deepEqual(done.stdout.trim().split('\n').map((l) => JSON.parse(l)),
    [{ redrive_worker: 1, concurrency: 1 }, { type: 'result', id: 'a', outcome: 'ok' }]);
  assert.match(done.stderr, /a log line from the handler/);
});
