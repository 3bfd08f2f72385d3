/** The worker protocol version this helper speaks. */
export const PROTOCOL_VERSION: 1;

/** One delivery of a message. */
export interface Message {
  /** Stable across retries, crashes and replays: make handlers idempotent on it. */
  readonly id: string;
  readonly queue: string;
  /** 0 on the first delivery. */
  readonly attempt: number;
  readonly replays: number;
  readonly key: string | null;
  readonly headers: Readonly<Record<string, string>>;
  readonly payload: Buffer;
  /** The payload as UTF-8 text. */
  readonly text: string;
  /** The payload parsed as JSON. */
  json<T = unknown>(): T;
  /**
   * Notes what this attempt used: if it fails, redrive keeps it with the failure (shown
   * per attempt in triage, summed per error group). Costs add up; the last model and
   * tool named win.
   */
  record(what: AgentContext): void;
}

/** What an attempt cost. */
export interface Cost {
  inputTokens?: number;
  outputTokens?: number;
  /** US dollars. */
  usd?: number;
}

/** What an attempt used: the model it called, the tool it ran, what it cost. */
export interface AgentContext {
  model?: string;
  tool?: string;
  cost?: Cost;
}

export interface FailureOptions extends AgentContext {
  /** The error class failures are grouped by in triage (default: the exception's name). */
  errorClass?: string;
}

/** The message can never succeed: it goes straight to the dead-letter queue. */
export class Poison extends Error {
  constructor(message?: string, options?: FailureOptions);
  readonly errorClass?: string;
  readonly model?: string;
  readonly tool?: string;
  readonly cost?: Cost;
}

/** A transient failure: the next retry tier, and at least `after` seconds when given. */
export class Retry extends Error {
  constructor(message?: string, options?: FailureOptions & { after?: number });
  readonly errorClass?: string;
  readonly model?: string;
  readonly tool?: string;
  readonly cost?: Cost;
  readonly after?: number;
}

export type Handler = (message: Message) => void | Promise<void>;

export interface RunOptions {
  /** Deliveries this process takes at once (default 1). */
  concurrency?: number;
  /** For tests: where deliveries come from (default: process.stdin). */
  input?: NodeJS.ReadableStream;
  /** For tests: where the protocol goes (default: process.stdout, which is then kept for it). */
  output?: { write(chunk: string): unknown };
}

/**
 * Serves deliveries from redrive until it closes standard input. Returning means done;
 * throwing `Poison` sends the message to the DLQ; `Retry` or any other error, to its
 * next retry tier. While it runs, console output goes to standard error (redrive's log).
 */
export function run(handler: Handler, options?: RunOptions): Promise<void>;
