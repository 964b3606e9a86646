// /metrics after a scripted session with the real clients, read with a Prometheus text parser.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import parsePrometheusTextFormat from 'parse-prometheus-text-format';
import { startGateway, token, api, sleep } from './lib/gateway.mjs';
import { socketio, ws } from './lib/clients.mjs';

/** The exposition as families; each counter or gauge series as {labels, value}. */
async function scrape(url) {
  const res = await fetch(`${url}/metrics`);
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type'), /^text\/plain; version=0\.0\.4/);
  return parsePrometheusTextFormat(await res.text());
}

/** A counter's or gauge's value summed over the series whose labels include `labels`. */
function value(families, name, labels = {}) {
  const family = families.find((f) => f.name === name);
  if (!family) return 0;
  assert.ok(['COUNTER', 'GAUGE'].includes(family.type), `${name} is a ${family.type}`);
  return family.metrics
    .filter((m) => Object.entries(labels).every(([k, v]) => (m.labels ?? {})[k] === v))
    .reduce((sum, m) => sum + Number(m.value), 0);
}

async function eventually(what, check, timeoutMs = 5000) {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const families = await scrape(what.url);
    if (check(families)) return families;
    if (Date.now() > until) throw new Error(`${what.name} not reached within ${timeoutMs} ms`);
    await sleep(50);
  }
}

describe('metrics', () => {
  let gw;
  before(async () => {
    gw = await startGateway({ env: { CONFAB_MESSAGES_PER_SECOND: '1', CONFAB_MESSAGE_BURST: '4' } });
  });
  after(async () => { await gw.stop(); });

  it('count a scripted session over both transports exactly', async () => {
    const [ta, tb] = [token('m-alice'), token('m-bob')];
    const created = await api(gw.url, ta, 'POST', '/api/conversations', { kind: 'group', title: 'Metrics', members: ['m-bob'] });
    assert.equal(created.status, 201, JSON.stringify(created.body));
    const conversationId = created.body.conversation.id;

    const alice = await socketio(gw.url, ta);
    const bob = await ws(gw.url, tb);
    let families = await scrape(gw.url);
    assert.equal(value(families, 'confab_connections'), 2, 'the operator sums this over transports');
    assert.equal(value(families, 'confab_connections', { transport: 'socketio' }), 1);
    assert.equal(value(families, 'confab_connections', { transport: 'ws' }), 1);

    for (const c of [alice, bob]) await c.request('join_conversation', { conversationId });
    // A burst of four passes; the next two are rate-limited.
    let limited = 0;
    for (let i = 0; i < 6; i++) {
      const ack = await alice.request('send_message', { conversationId, content: `hi ${i}`, type: 'text', clientMsgId: `mm-${i}` });
      if (ack.error) { assert.equal(ack.error.code, 'rate_limited'); limited++; }
    }
    assert.equal(limited, 2);
    for (let i = 0; i < 4; i++) await bob.waitFor('new_message', (m) => m.clientMsgId === `mm-${i}`);

    // Bad tokens on both transports.
    await assert.rejects(socketio(gw.url, 'not-a-token'), /unauthorized/);
    await assert.rejects(ws(gw.url, token('m-eve', { ttlSeconds: -60 })));

    families = await eventually({ url: gw.url, name: 'deliveries' },
      (f) => value(f, 'confab_messages_sent_total') >= 8);
    assert.equal(value(families, 'confab_connects_total', { transport: 'socketio' }), 1);
    assert.equal(value(families, 'confab_connects_total', { transport: 'ws' }), 1);
    assert.equal(value(families, 'confab_messages_received_total', { transport: 'socketio' }), 6);
    assert.equal(value(families, 'confab_messages_persisted_total'), 4);
    assert.equal(value(families, 'confab_rate_limited_total', { class: 'user_messages' }), 2);
    assert.equal(value(families, 'confab_messages_sent_total', { transport: 'socketio' }), 4, "alice's own copies");
    assert.equal(value(families, 'confab_messages_sent_total', { transport: 'ws' }), 4);
    assert.equal(value(families, 'confab_auth_failures_total', { transport: 'socketio', reason: 'malformed' }), 1);
    assert.equal(value(families, 'confab_auth_failures_total', { transport: 'ws', reason: 'expired' }), 1);
    assert.equal(value(families, 'confab_draining'), 0);
    const histograms = families.filter((f) => f.type === 'HISTOGRAM').map((f) => f.name).sort();
    for (const h of ['confab_ack_duration_seconds', 'confab_delivery_duration_seconds', 'confab_fanout_size']) {
      assert.ok(histograms.includes(h), `${h} in ${histograms}`);
    }

    // Bob drops and comes back: a reconnect; alice's count is untouched.
    bob.close();
    await eventually({ url: gw.url, name: 'the disconnect' }, (f) => value(f, 'confab_disconnects_total', { transport: 'ws' }) === 1);
    const bobAgain = await ws(gw.url, tb);
    families = await scrape(gw.url);
    assert.equal(value(families, 'confab_reconnects_total', { transport: 'ws' }), 1);
    assert.equal(value(families, 'confab_reconnects_total', { transport: 'socketio' }), 0);
    assert.equal(value(families, 'confab_connections'), 2);
    alice.close();
    bobAgain.close();
  });

  it('is switched off by CONFAB_METRICS=false', async () => {
    const off = await startGateway({ env: { CONFAB_METRICS: 'false' } });
    try {
      const res = await fetch(`${off.url}/metrics`);
      assert.equal(res.status, 404);
    } finally {
      await off.stop();
    }
  });
});
