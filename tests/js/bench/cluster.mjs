// Cross-node delivery benchmark: three gateways sharing Postgres, Redis and RabbitMQ; senders
// on the first, receivers on the other two. Prints delivery latency p50/p99 (send → socket
// receipt on another node) and deliveries per second.
//   node tests/js/bench/cluster.mjs [messages=2000] [receiversPerNode=25] [senders=8] [bus=rabbitmq]
import { randomUUID } from 'node:crypto';
import { token, api } from '../lib/gateway.mjs';
import { socketio as connect } from '../lib/clients.mjs';
import { createFleetBackends, startFleetGateway } from '../lib/cluster.mjs';

const [messages = 2000, perNode = 25, senders = 8, bus = 'rabbitmq'] = process.argv.slice(2).map((v, i) => (i < 3 ? Number(v) : v));
const backends = createFleetBackends();
const env = { CONFAB_MESSAGES_PER_SECOND: '100000', CONFAB_MESSAGE_BURST: '100000', CONFAB_EVENTS_PER_SECOND: '100000', CONFAB_EVENT_BURST: '100000', CONFAB_CONNECTS_PER_SECOND: '10000', CONFAB_CONNECT_BURST: '10000', CONFAB_MAX_CONNECTIONS_PER_ADDRESS: '100000' };
const g1 = await startFleetGateway(backends, { bus, env });
const [g2, g3] = await Promise.all([startFleetGateway(backends, { bus, env }), startFleetGateway(backends, { bus, env })]);
try {
  const owner = `bench-owner-${randomUUID().slice(0, 8)}`;
  const created = await api(g1.url, token(owner), 'POST', '/api/conversations', { kind: 'open', title: 'bench', members: [] });
  const conversationId = created.body.conversation.id;
  const latencies = [];
  let firstSend = 0; let lastReceipt = 0;
  const receivers = [];
  for (const g of [g2, g3]) {
    for (let i = 0; i < perNode; i += 1) {
      const c = await connect(g.url, token(`bench-r-${randomUUID().slice(0, 8)}`));
      await c.request('join_conversation', { conversationId }, 30000);
      c.socket.on('new_message', (m) => { const now = Date.now(); latencies.push(now - Number(m.content)); lastReceipt = now; });
      receivers.push(c);
    }
  }
  const sendersList = [];
  for (let i = 0; i < senders; i += 1) {
    const s = await connect(g1.url, token(`bench-s-${i}-${randomUUID().slice(0, 8)}`));
    await s.request('join_conversation', { conversationId }, 30000);
    sendersList.push(s);
  }
  const expected = messages * receivers.length;
  firstSend = Date.now();
  let next = 0;
  await Promise.all(sendersList.map(async (s) => {
    while (next < messages) {
      next += 1;
      await s.request('send_message', { conversationId, content: String(Date.now()), type: 'text', clientMsgId: randomUUID() }, 30000);
    }
  }));
  const deadline = Date.now() + 30000;
  while (latencies.length < expected && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  latencies.sort((a, b) => a - b);
  const q = (p) => latencies[Math.min(latencies.length - 1, Math.floor(p * latencies.length))];
  const seconds = (lastReceipt - firstSend) / 1000;
  console.log(`bus=${bus} messages=${messages} cross-node receivers=${receivers.length} senders=${senders}`);
  console.log(`deliveries ${latencies.length}/${expected} in ${seconds.toFixed(2)} s = ${Math.round(latencies.length / seconds)} deliveries/s (${Math.round(messages / seconds)} messages/s)`);
  console.log(`cross-node delivery latency p50 ${q(0.5)} ms, p99 ${q(0.99)} ms, max ${latencies.at(-1)} ms`);
  for (const c of [...receivers, ...sendersList]) c.close();
} finally {
  await Promise.all([g1, g2, g3].map((g) => g.stop('SIGKILL')));
  backends.drop();
}
