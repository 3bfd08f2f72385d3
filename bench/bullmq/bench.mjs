// BullMQ under the scenario of `redrive bench --broker redis://…`:
// N jobs added in bulk, one worker with concurrency C and a no-op processor;
// 10% fail once, 1% always fail; 4 attempts with exponential backoff of base DELAY_MS
// (D, 2D, 4D ms: redrive's tiers). Completed jobs are removed
// (redrive deletes acknowledged messages too); failed jobs are kept (redrive keeps
// dead ones). Timed from the worker's start until every job is completed or failed.
import { Queue, Worker } from 'bullmq';

const url = new URL(process.env.REDIS_URL ?? 'redis://127.0.0.1:6379');
const connection = { host: url.hostname, port: Number(url.port || 6379), maxRetriesPerRequest: null };
const N = Number(process.env.N ?? 20000);
const C = Number(process.env.CONCURRENCY ?? 50);
const name = `redrive-bench-${Date.now()}`;

const queue = new Queue(name, { connection });
const delay = Number(process.env.DELAY_MS ?? 100);
const opts = { attempts: 4, backoff: { type: 'exponential', delay }, removeOnComplete: true, removeOnFail: false };

const t0 = performance.now();
for (let start = 0; start < N; start += 1000) {
  const jobs = [];
  for (let n = start; n < Math.min(N, start + 1000); n++) jobs.push({ name: 'task', data: { n }, opts });
  await queue.addBulk(jobs);
}
const publishSecs = (performance.now() - t0) / 1000;

let completed = 0;
let failed = 0;
let retries = 0;
let done;
const finished = new Promise((resolve) => { done = resolve; });
const t1 = performance.now();
const worker = new Worker(name, async (job) => {
  const n = job.data.n;
  if (n % 100 === 7) throw new Error('fails every time by design');
  if (n % 10 === 0 && job.attemptsMade === 0) throw new Error('fails once by design');
}, { connection, concurrency: C });
worker.on('completed', () => { completed++; if (completed + failed === N) done(); });
worker.on('failed', (job) => {
  if (job && job.attemptsMade >= opts.attempts) { failed++; if (completed + failed === N) done(); } else { retries++; }
});
await finished;
const processSecs = (performance.now() - t1) / 1000;
await worker.close();
const counts = await queue.getJobCounts('failed', 'completed', 'waiting', 'delayed', 'active');
await queue.obliterate({ force: true });
await queue.close();
console.log(JSON.stringify({
  tool: 'bullmq', jobs: N, concurrency: C, backoff_ms: [delay, 2 * delay, 4 * delay], publish_secs: publishSecs, process_secs: processSecs,
  jobs_per_sec: N / processSecs, completed, dead: counts.failed, retried: retries, left: counts,
}));
