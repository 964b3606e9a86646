// Attachment upload throughput and the gateway's memory while uploads stream: `clients` users
// each upload `mib` MiB at once over HTTP (raw body, Content-Length), `rounds` times, against a
// release gateway with the local attachment store. Reports MB/s (all bytes of a round over its
// wall time, first request to last 201) and the gateway's peak RSS (VmHWM from /proc, the
// kernel's high-water mark, so no sample can miss the peak), next to its RSS before the first
// round. A streaming upload path keeps the peak far below clients × size.
//   cargo build --release -p confab-gateway
//   CONFAB_GATEWAY_BIN=$CARGO_TARGET_DIR/release/confab-gateway node tests/js/bench/attachments-upload.mjs [clients=10] [mib=10] [rounds=3]
// Waits while /tmp/confab-quiet exists (another benchmark has the machine).
import { existsSync, readFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { startGateway, token, api, sleep, gatewayBin } from '../lib/gateway.mjs';

const [clients = 10, mib = 10, rounds = 3] = process.argv.slice(2).map(Number);
while (existsSync('/tmp/confab-quiet')) await sleep(20000);

const bin = process.env.CONFAB_GATEWAY_BIN ?? gatewayBin('release');
const size = mib * 1024 * 1024;
const gw = await startGateway({
  bin,
  env: {
    RUST_LOG: 'warn',
    CONFAB_MAX_ATTACHMENT_BYTES: String(size),
    CONFAB_MESSAGES_PER_SECOND: '1000', CONFAB_MESSAGE_BURST: '1000',
    CONFAB_API_REQUESTS_PER_SECOND: '1000', CONFAB_API_REQUEST_BURST: '1000',
  },
});
const kib = (field) => Number(readFileSync(`/proc/${gw.proc.pid}/status`, 'utf8').match(new RegExp(`${field}:\\s+(\\d+) kB`))[1]);

try {
  const users = Array.from({ length: clients }, (_, i) => `uploader-${i}`);
  const owner = token(users[0]);
  const created = await api(gw.url, owner, 'POST', '/api/conversations', { kind: 'group', title: 'uploads', members: users.slice(1) });
  if (created.status !== 201) throw new Error(`create: ${created.status} ${JSON.stringify(created.body)}`);
  const conversationId = created.body.conversation.id;
  const tokens = users.map((u) => token(u));
  // Warm the server's allocator and routes with one small upload, then read the baseline.
  await fetch(`${gw.url}/api/conversations/${conversationId}/attachments?name=warm.bin`, {
    method: 'POST', headers: { authorization: `Bearer ${owner}` }, body: randomBytes(1024),
  });
  const idleRss = kib('VmRSS');
  const results = [];
  for (let round = 1; round <= rounds; round += 1) {
    // Fresh bytes every round: content addressing would otherwise store nothing new.
    const bodies = tokens.map(() => randomBytes(size));
    const started = performance.now();
    const answers = await Promise.all(bodies.map(async (body, i) => {
      const res = await fetch(`${gw.url}/api/conversations/${conversationId}/attachments?name=r${round}-${i}.bin`, {
        method: 'POST',
        headers: { authorization: `Bearer ${tokens[i]}`, 'content-type': 'application/octet-stream' },
        body,
      });
      const json = await res.json();
      if (res.status !== 201 || json.attachment.size !== size) throw new Error(`upload ${i}: ${res.status} ${JSON.stringify(json)}`);
      return performance.now();
    }));
    const seconds = (Math.max(...answers) - started) / 1000;
    const mbPerSecond = (clients * size) / 1e6 / seconds;
    results.push({ round, seconds, mbPerSecond, peakRssKiB: kib('VmHWM') });
    console.log(`round ${round}: ${clients} × ${mib} MiB in ${seconds.toFixed(2)} s = ${mbPerSecond.toFixed(1)} MB/s; gateway peak RSS so far ${(kib('VmHWM') / 1024).toFixed(1)} MiB`);
  }
  const sorted = [...results].sort((a, b) => a.mbPerSecond - b.mbPerSecond);
  const median = sorted[Math.floor(sorted.length / 2)];
  console.log(JSON.stringify({
    clients, mib, rounds,
    medianMbPerSecond: Number(median.mbPerSecond.toFixed(1)),
    idleRssMiB: Number((idleRss / 1024).toFixed(1)),
    peakRssMiB: Number((kib('VmHWM') / 1024).toFixed(1)),
  }));
} finally {
  await gw.stop();
}
