// pg-boss under the scenario of `redrive-bench postgres://…`: N jobs inserted in bulk,
// C jobs in flight, a no-op handler; 10% fail once, 1% always fail; 4 attempts, then
// the dead-letter queue. Timed from the consumers' start until every job is completed
// or failed.
//
// MODE=batch (default): one loop fetching up to C jobs, running them all, then
// completing the ones that passed in one call and failing the others in one call per
// error, and fetching again at once (a 20 ms nap only when nothing is due). The fastest
// way to run pg-boss 10 at concurrency C found so far.
// MODE=fetch: C loops, each fetching one job, running it and completing or failing it
// by id, with no wait between jobs (a 20 ms nap only when nothing is due).
// MODE=work: pg-boss's own worker, `work()` with batchSize C and the shortest polling
// interval it accepts (0.5 s); each job completed or failed on its own. Its loop waits
// out the polling interval after every batch, so it is bound to C jobs per 0.5 s.
//
// Retries: pg-boss's retry delay is whole seconds, so its retries run at once
// (retryDelay 0); redrive's wait their tiers (10, 20, 40 ms by default). The difference
// favours pg-boss.
import PgBoss from 'pg-boss';

const N = Number(process.env.N ?? 20000);
const C = Number(process.env.CONCURRENCY ?? 50);
const MODE = process.env.MODE ?? 'batch';
const schema = `pgboss_bench_${Date.now()}`;
const boss = new PgBoss({ connectionString: process.env.PG_URL ?? 'postgres://postgres@127.0.0.1:5432/test', schema, max: 10, supervise: false, schedule: false });
boss.on('error', (e) => console.error(e));
await boss.start();

const name = 'bench';
const dead = 'bench_dead';
await boss.createQueue(dead);
await boss.createQueue(name, { retryLimit: 3, retryDelay: 0, retryBackoff: false, deadLetter: dead });

const t0 = performance.now();
for (let start = 0; start < N; start += 1000) {
  const jobs = [];
  for (let n = start; n < Math.min(N, start + 1000); n++) jobs.push({ name, data: { n } });
  await boss.insert(jobs);
}
const publishSecs = (performance.now() - t0) / 1000;

// The handler: an Error for a failing attempt, nothing otherwise.
const run = (job, retryCount) => {
  const n = job.data.n;
  if (n % 100 === 7) return new Error('fails every time by design');
  if (n % 10 === 0 && retryCount === 0) return new Error('fails once by design');
  return null;
};

let completed = 0;
let failed = 0;
let retries = 0;
const settle = async (job) => {
  const error = run(job, job.retryCount);
  if (error === null) {
    await boss.complete(name, job.id);
    completed++;
  } else {
    await boss.fail(name, job.id, { message: error.message });
    if (job.retryCount >= 3) failed++; else retries++;
  }
};

const t1 = performance.now();
if (MODE === 'work') {
  let done;
  const finished = new Promise((resolve) => { done = resolve; });
  await boss.work(name, { batchSize: C, pollingIntervalSeconds: 0.5, includeMetadata: true }, async (jobs) => {
    await Promise.all(jobs.map(settle));
    if (completed + failed === N) done();
  });
  await finished;
} else if (MODE === 'batch') {
  while (completed + failed < N) {
    const jobs = await boss.fetch(name, { batchSize: C, includeMetadata: true });
    if (jobs.length === 0) { await new Promise((r) => setTimeout(r, 20)); continue; }
    const passed = [];
    const byError = new Map();
    for (const job of jobs) {
      const error = run(job, job.retryCount);
      if (error === null) { passed.push(job.id); continue; }
      if (!byError.has(error.message)) byError.set(error.message, []);
      byError.get(error.message).push(job);
    }
    const calls = [];
    if (passed.length > 0) calls.push(boss.complete(name, passed).then(() => { completed += passed.length; }));
    for (const [message, failing] of byError) {
      calls.push(boss.fail(name, failing.map((j) => j.id), { message }).then(() => {
        for (const j of failing) { if (j.retryCount >= 3) failed++; else retries++; }
      }));
    }
    await Promise.all(calls);
  }
} else {
  const loop = async () => {
    while (completed + failed < N) {
      const [job] = await boss.fetch(name, { batchSize: 1, includeMetadata: true });
      if (job) await settle(job); else await new Promise((r) => setTimeout(r, 20));
    }
  };
  await Promise.all(Array.from({ length: C }, loop));
}
const processSecs = (performance.now() - t1) / 1000;
const deadCount = await boss.getQueueSize(dead);
await boss.stop({ graceful: false, wait: true });
// Leave the shared database as it was.
const { default: pg } = await import('pg');
const client = new pg.Client({ connectionString: process.env.PG_URL ?? 'postgres://postgres@127.0.0.1:5432/test' });
await client.connect();
await client.query(`DROP SCHEMA IF EXISTS ${schema} CASCADE`);
await client.end();
console.log(JSON.stringify({
  tool: `pg-boss (${MODE})`, jobs: N, concurrency: C, retry_delay_ms: 0, publish_secs: publishSecs, process_secs: processSecs,
  jobs_per_sec: N / processSecs, completed, dead: deadCount, retried: retries,
}));
