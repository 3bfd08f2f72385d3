// The redrive worker protocol (docs/worker-protocol.md) for Node.js. Types: index.d.ts.
import { createInterface } from 'node:readline';

export const PROTOCOL_VERSION = 1;

export class Poison extends Error {
  constructor(message = '', options = {}) {
    super(message);
    this.name = 'Poison';
    this.errorClass = options.errorClass;
  }
}

export class Retry extends Error {
  constructor(message = '', options = {}) {
    super(message);
    this.name = 'Retry';
    this.errorClass = options.errorClass;
    this.after = options.after;
  }
}

function message(line) {
  const payload = line.payload_base64 !== undefined
    ? Buffer.from(line.payload_base64, 'base64')
    : Buffer.from(String(line.payload ?? ''), 'utf8');
  return Object.freeze({
    id: line.id,
    queue: line.queue ?? '',
    attempt: Number(line.attempt ?? 0),
    replays: Number(line.replays ?? 0),
    key: line.key ?? null,
    headers: Object.freeze({ ...(line.headers ?? {}) }),
    payload,
    get text() { return payload.toString('utf8'); },
    json() { return JSON.parse(payload.toString('utf8')); },
  });
}

function result(id, error) {
  if (error === undefined) return { type: 'result', id, outcome: 'ok' };
  const outcome = error instanceof Poison ? 'poison' : 'retry';
  const out = {
    type: 'result',
    id,
    outcome,
    class: error?.errorClass ?? error?.name ?? typeof error,
    message: String(error?.message ?? error).slice(0, 4096),
  };
  if (error instanceof Retry && typeof error.after === 'number' && Number.isFinite(error.after)) {
    out.retry_after = error.after;
  }
  return out;
}

/** Keeps the real stdout for the protocol; everything else written there goes to stderr. */
function protocolOutput() {
  const write = process.stdout.write.bind(process.stdout);
  process.stdout.write = process.stderr.write.bind(process.stderr);
  return { write };
}

export async function run(handler, options = {}) {
  const concurrency = options.concurrency ?? 1;
  if (!Number.isInteger(concurrency) || concurrency < 1) {
    throw new RangeError('concurrency must be an integer of at least 1');
  }
  const output = options.output ?? protocolOutput();
  const send = (line) => output.write(`${JSON.stringify(line)}\n`);
  send({ redrive_worker: PROTOCOL_VERSION, concurrency });
  const running = new Set();
  const lines = createInterface({ input: options.input ?? process.stdin, crlfDelay: Infinity });
  for await (const raw of lines) {
    if (raw.trim() === '') continue;
    let line;
    try {
      line = JSON.parse(raw);
    } catch (e) {
      process.stderr.write(`redrive-worker: ignoring a line that is not JSON: ${e.message}\n`);
      continue;
    }
    if ((line.type ?? 'delivery') !== 'delivery') continue;
    const task = (async () => {
      let error;
      try {
        await handler(message(line));
      } catch (e) {
        error = e ?? new Error('thrown without a value');
      }
      send(result(line.id, error));
    })();
    running.add(task);
    task.finally(() => running.delete(task));
  }
  await Promise.all(running);
}
