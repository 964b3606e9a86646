// Cost of the metrics: the same closed-loop load against a gateway with CONFAB_METRICS=true and
// =false, alternating, several rounds each. Reports acked messages/s, deliveries/s and the
// gateway's CPU time per message (from /proc, so it shows the cost even when the load generator
// is the bottleneck). The gateway is pinned to core 0 when `taskset` exists; run this script on
// the other core(s):
//   CONFAB_GATEWAY_BIN=…/release/confab-gateway taskset -c 1 node tests/js/bench/metrics-overhead.mjs \
//     [rounds=3] [seconds=10] [receivers=50] [senders=4] [inFlight=8]
// On a shared machine wall-clock numbers are noisy; CONFAB_BENCH_CALLGRIND=1 runs the gateway
// under valgrind's callgrind instead and reports instructions executed per message during the
// measured window (deterministic, but ~50× slower: use a few seconds and small numbers).
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync, mkdtempSync, chmodSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import WebSocket from 'ws';
import { startGateway, token, api, sleep, gatewayBin } from '../lib/gateway.mjs';

const [rounds = 3, seconds = 10, receivers = 50, senders = 4, inFlight = 8] = process.argv.slice(2).map(Number);
const env = {
  RUST_LOG: 'warn',
  CONFAB_MESSAGES_PER_SECOND: '1000000', CONFAB_MESSAGE_BURST: '1000000',
  CONFAB_EVENTS_PER_SECOND: '1000000', CONFAB_EVENT_BURST: '1000000',
  CONFAB_CONNECTS_PER_SECOND: '100000', CONFAB_CONNECT_BURST: '100000',
  CONFAB_SEND_QUEUE: '4096',
};
const TICKS = Number(execFileSync('getconf', ['CLK_TCK']).toString().trim());
const callgrind = process.env.CONFAB_BENCH_CALLGRIND === '1';
const scratch = mkdtempSync(join(tmpdir(), 'confab-overhead-'));
if (callgrind) {
  // The gateway under callgrind, instrumented only while told to (the measured window).
  const wrapper = join(scratch, 'gateway-under-callgrind.sh');
  writeFileSync(wrapper, `#!/bin/sh\nexec valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=${scratch}/callgrind.%p "${gatewayBin()}" "$@"\n`);
  chmodSync(wrapper, 0o755);
  process.env.CONFAB_GATEWAY_BIN = wrapper;
}

/** Instructions callgrind counted for process `pid` (its collected window). */
function instructions(pid) {
  const file = readdirSync(scratch).find((f) => f === `callgrind.${pid}`);
  const text = readFileSync(join(scratch, file), 'utf8');
  const totals = text.split('\n').find((l) => l.startsWith('totals:'));
  return Number(totals.split(/\s+/)[1]);
}

function cpuSeconds(pid) {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / TICKS; // utime + stime
}

function open(url, tok) {
  return new Promise((resolve, reject) => {
    const sock = new WebSocket(`${url.replace('http', 'ws')}/ws?token=${tok}`);
    sock.once('message', () => resolve(sock)); // `connected`
    sock.once('error', reject);
  });
}

function request(sock, pending, id, type, payload) {
  return new Promise((resolve) => { pending.set(id, resolve); sock.send(JSON.stringify({ type, id, payload })); });
}

async function round(metrics) {
  const gw = await startGateway({ env: { ...env, CONFAB_METRICS: String(metrics) } });
  try {
    try { execFileSync('taskset', ['-a', '-cp', '0', String(gw.proc.pid)], { stdio: 'ignore' }); } catch { /* no taskset */ }
    const owner = token('bench-owner');
    const created = await api(gw.url, owner, 'POST', '/api/conversations', { kind: 'open', title: 'bench', members: [] });
    const conversationId = created.body.conversation.id;
    let deliveries = 0;
    const all = [];
    for (let i = 0; i < receivers + senders; i += 1) {
      const sock = await open(gw.url, token(`bench-${i}`));
      const pending = new Map();
      sock.on('message', (data) => {
        const text = data.toString();
        if (text.startsWith('{"type":"new_message"')) { deliveries += 1; return; }
        if (text.startsWith('{"type":"ack"') || text.startsWith('{"type":"error"')) {
          const { id } = JSON.parse(text);
          const done = pending.get(id);
          if (done) { pending.delete(id); done(text); }
        }
      });
      await request(sock, pending, 0, 'join_conversation', { conversationId });
      all.push({ sock, pending });
    }
    const sending = all.slice(receivers);
    let acked = 0; let errors = 0; let stop = false; let next = 1;
    const loop = async ({ sock, pending }) => {
      while (!stop) {
        const id = next++;
        const reply = await request(sock, pending, id, 'send_message', { conversationId, content: `m${id}`, type: 'text', clientMsgId: `c${id}` });
        if (reply.startsWith('{"type":"ack"')) acked += 1; else errors += 1;
      }
    };
    // One second of warm-up, then the measured window.
    const loops = sending.flatMap((s) => Array.from({ length: inFlight }, () => loop(s)));
    await sleep(1000);
    if (callgrind) execFileSync('callgrind_control', ['-i', 'on', String(gw.proc.pid)], { stdio: 'ignore' });
    const [a0, d0, c0, t0] = [acked, deliveries, cpuSeconds(gw.proc.pid), process.hrtime.bigint()];
    await sleep(seconds * 1000);
    const [a1, d1, c1, t1] = [acked, deliveries, cpuSeconds(gw.proc.pid), process.hrtime.bigint()];
    if (callgrind) execFileSync('callgrind_control', ['-i', 'off', String(gw.proc.pid)], { stdio: 'ignore' });
    stop = true;
    await Promise.all(loops);
    for (const { sock } of all) sock.close();
    const wall = Number(t1 - t0) / 1e9;
    const msgs = a1 - a0;
    const result = { metrics, msgPerSec: msgs / wall, deliveriesPerSec: (d1 - d0) / wall, cpuUsPerMsg: ((c1 - c0) * 1e6) / msgs, errors };
    await gw.stop();
    // Messages acked while collection was on, give or take the in-flight ones at each edge.
    if (callgrind) result.instructionsPerMsg = instructions(gw.proc.pid) / msgs;
    return result;
  } finally {
    await gw.stop();
  }
}

const median = (xs) => { const s = [...xs].sort((x, y) => x - y); return s[Math.floor(s.length / 2)]; };
const results = { true: [], false: [] };
for (let r = 0; r < rounds; r += 1) {
  for (const m of r % 2 === 0 ? [true, false] : [false, true]) {
    const res = await round(m);
    results[m].push(res);
    const ir = res.instructionsPerMsg ? `, ${(res.instructionsPerMsg / 1000).toFixed(1)}k instructions/msg` : '';
    console.log(`round ${r + 1} metrics=${m}: ${res.msgPerSec.toFixed(0)} msg/s, ${res.deliveriesPerSec.toFixed(0)} deliveries/s, ${res.cpuUsPerMsg.toFixed(1)} µs CPU/msg${ir}, ${res.errors} errors`);
  }
}
const summary = (m) => ({
  msgPerSec: median(results[m].map((x) => x.msgPerSec)),
  deliveriesPerSec: median(results[m].map((x) => x.deliveriesPerSec)),
  cpuUsPerMsg: median(results[m].map((x) => x.cpuUsPerMsg)),
});
const on = summary(true); const off = summary(false);
// Each round runs both modes back to back: their ratio cancels most of the drift a shared
// machine adds between rounds.
const paired = results.true.map((x, i) => 1 - x.msgPerSec / results.false[i].msgPerSec);
console.log(`median metrics on : ${on.msgPerSec.toFixed(0)} msg/s, ${on.deliveriesPerSec.toFixed(0)} deliveries/s, ${on.cpuUsPerMsg.toFixed(1)} µs CPU/msg`);
console.log(`median metrics off: ${off.msgPerSec.toFixed(0)} msg/s, ${off.deliveriesPerSec.toFixed(0)} deliveries/s, ${off.cpuUsPerMsg.toFixed(1)} µs CPU/msg`);
if (callgrind) {
  const irOn = median(results.true.map((x) => x.instructionsPerMsg));
  const irOff = median(results.false.map((x) => x.instructionsPerMsg));
  console.log(`median instructions/msg: on ${(irOn / 1000).toFixed(1)}k, off ${(irOff / 1000).toFixed(1)}k: cost ${((irOn / irOff - 1) * 100).toFixed(1)} %`);
} else {
  console.log(`throughput cost: ${((1 - on.msgPerSec / off.msgPerSec) * 100).toFixed(1)} % (medians), ${(median(paired) * 100).toFixed(1)} % (median of back-to-back pairs); CPU per message: ${((on.cpuUsPerMsg / off.cpuUsPerMsg - 1) * 100).toFixed(1)} %`);
}
