// The redrive worker protocol (docs/worker-protocol.md) for Node.js. Types: index.d.ts.
import { createInterface } from 'node:readline';

export const PROTOCOL_VERSION = 1;

function agentOptions(target, options) {
  target.errorClass = options.errorClass;
  target.model = options.model;
  target.tool = options.tool;
  target.cost = options.cost;
}

export class Poison extends Error {
  constructor(message = '', options = {}) {
    super(message);
    this.name = 'Poison';
    agentOptions(this, options);
  }
}

export class Retry extends Error {
  constructor(message = '', options = {}) {
    super(message);
    this.name = 'Retry';
    agentOptions(this, options);
    this.after = options.after;
  }
}

const AGENT = Symbol('agent');

/** The model, tool and cost one attempt recorded: the last model and tool win, costs add up. */
class Agent {
  record({ model, tool, cost } = {}) {
    if (model !== undefined) this.model = String(model);
    if (tool !== undefined) this.tool = String(tool);
    if (cost !== undefined) {
      const c = this.cost ?? { inputTokens: 0, outputTokens: 0, usd: 0 };
      this.cost = {
        inputTokens: c.inputTokens + Number(cost.inputTokens ?? 0),
        outputTokens: c.outputTokens + Number(cost.outputTokens ?? 0),
        usd: c.usd + Number(cost.usd ?? 0),
      };
    }
  }
}

function message(line) {
  const payload = line.payload_base64 !== undefined
    ? Buffer.from(line.payload_base64, 'base64')
    : Buffer.from(String(line.payload ?? ''), 'utf8');
  const agent = new Agent();
  return Object.freeze({
    [AGENT]: agent,
    id: line.id,
    queue: line.queue ?? '',
    attempt: Number(line.attempt ?? 0),
    replays: Number(line.replays ?? 0),
    key: line.key ?? null,
    headers: Object.freeze({ ...(line.headers ?? {}) }),
    payload,
    get text() { return payload.toString('utf8'); },
    json() { return JSON.parse(payload.toString('utf8')); },
    record(what) { agent.record(what); },
  });
}

function result(id, error, agent = new Agent()) {
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
  if (error instanceof Poison || error instanceof Retry) {
    agent.record({ model: error.model, tool: error.tool, cost: error.cost });
  }
  if (agent.model !== undefined) out.model = agent.model;
  if (agent.tool !== undefined) out.tool = agent.tool;
  if (agent.cost !== undefined) {
    const { inputTokens, outputTokens, usd } = agent.cost;
    out.cost = { input_tokens: Math.trunc(inputTokens), output_tokens: Math.trunc(outputTokens), usd };
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
  output.write(`${JSON.stringify({ redrive_worker: PROTOCOL_VERSION, concurrency })}\n`);
  // Results finished in one turn of the event loop leave in one write, at its end.
  let waiting = [];
  const flush = () => {
    if (waiting.length === 0) return;
    output.write(`${waiting.join('\n')}\n`);
    waiting = [];
  };
  const send = (line) => {
    waiting.push(JSON.stringify(line));
    if (waiting.length === 1) setImmediate(flush);
  };
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
      const msg = message(line);
      try {
        await handler(msg);
      } catch (e) {
        error = e ?? new Error('thrown without a value');
      }
      send(result(line.id, error, msg[AGENT]));
    })();
    running.add(task);
    task.finally(() => running.delete(task));
  }
  await Promise.all(running);
  flush();
}
