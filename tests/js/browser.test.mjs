// The web page at `/`, driven in Debian's Chromium through playwright-core: two users in two
// browser contexts (desktop and phone width), a gateway restart under an open page, history
// scroll-back. Screenshots go to artifacts/ (not committed). No Chromium: the suite fails.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { randomUUID } from 'node:crypto';
import { chromium } from 'playwright-core';
import { startGateway, api } from './lib/gateway.mjs';
import { socketio } from './lib/clients.mjs';
import { png } from './lib/images.mjs';

const CHROMIUM = process.env.CONFAB_CHROMIUM ?? '/usr/bin/chromium';
const ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];
const ARTIFACTS = fileURLToPath(new URL('../../artifacts/', import.meta.url));
const WAIT = { timeout: 15000 };
/** The banner while the gateway is away: draining (told to move) or reconnecting (cut off). */
const AWAY = '#banner:is([data-state="draining"], [data-state="reconnecting"])';

/** A gateway on its generated dev secret: what a newcomer gets with no settings at all. */
const startDevGateway = (options = {}) => startGateway({
  ...options,
  env: { CONFAB_JWT_SECRET: undefined, CONFAB_JWT_PUBLIC_KEY: undefined, ...options.env },
});

async function devToken(base, userId, name) {
  const res = await api(base, null, 'POST', '/api/dev/token', { userId, name });
  assert.equal(res.status, 200, JSON.stringify(res.body));
  return res.body.token;
}

/** Sends as Bob through a second gateway process on the same data directory (its own port and
 * in-process bus): the messages are committed, but no page connected elsewhere is told. */
async function sendElsewhere(dataDir, conversationId, contents, firstSeq) {
  const side = await startDevGateway({ dataDir });
  try {
    const bob = await socketio(side.url, await devToken(side.url, 'bob', 'Bob'));
    await bob.request('join_conversation', { conversationId });
    for (const [i, content] of contents.entries()) {
      const ack = await bob.request('send_message', { conversationId, content, type: 'text', clientMsgId: randomUUID() });
      assert.equal(ack.message.seq, firstSeq + i);
    }
    bob.close();
  } finally {
    await side.stop();
  }
}

/** Watches a page for what must never happen: uncaught errors and blocked (CSP) loads. */
function watch(page, label) {
  const problems = [];
  page.on('pageerror', (e) => problems.push(`${label}: uncaught ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' && /Content Security Policy|Refused to/i.test(m.text())) problems.push(`${label}: ${m.text()}`);
  });
  return problems;
}

const messageTexts = (page) => page.locator('#messages li.message').evaluateAll((items) => items.map((li) => ({
  seq: li.dataset.seq ? Number(li.dataset.seq) : null,
  clientMsgId: li.dataset.clientMsgId,
  content: li.querySelector('.content')?.textContent ?? '',
  status: li.querySelector('.status')?.dataset.status ?? null,
})));

function assertInOrderOnce(list, expected, label) {
  assert.deepEqual(list.map((m) => m.content), expected, `${label}: contents in order`);
  list.forEach((m, i) => assert.equal(m.seq, i + 1, `${label}: seq ${i + 1} in place, no gaps`));
  assert.equal(new Set(list.map((m) => m.clientMsgId)).size, list.length, `${label}: no duplicates`);
}

describe('web page in a real browser', () => {
  let browser;
  before(async () => {
    assert.ok(existsSync(CHROMIUM), `Chromium not found at ${CHROMIUM}: apt-get install -y chromium (scripts/test.sh does it)`);
    mkdirSync(ARTIFACTS, { recursive: true });
    browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS });
  });
  after(async () => { await browser?.close(); });

  it('two users chat, see typing and receipts, survive a gateway restart, and see markup as text', { timeout: 180000 }, async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'confab-web-'));
    let gw = await startDevGateway({ dataDir });
    const alicePage = await (await browser.newContext({ viewport: { width: 1280, height: 800 } })).newPage();
    const bobPage = await (await browser.newContext({
      viewport: { width: 375, height: 740 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true,
    })).newPage();
    const aliceProblems = watch(alicePage, 'alice');
    const bobProblems = watch(bobPage, 'bob');
    try {
      // Alice signs in with the dev one-click form, by keyboard only: focus starts in it.
      await alicePage.goto(gw.url);
      await alicePage.locator('#dev-signin').waitFor({ state: 'visible', ...WAIT });
      assert.equal(await alicePage.evaluate(() => document.activeElement.id), 'dev-user');
      await alicePage.keyboard.press('ControlOrMeta+a');
      await alicePage.keyboard.type('alice');
      await alicePage.keyboard.press('Tab');
      assert.equal(await alicePage.evaluate(() => document.activeElement.id), 'dev-name');
      await alicePage.keyboard.press('ControlOrMeta+a');
      await alicePage.keyboard.type('Alice');
      await alicePage.keyboard.press('Tab');
      assert.equal(await alicePage.evaluate(() => document.activeElement.textContent), 'Sign in');
      await alicePage.keyboard.press('Enter');
      await alicePage.locator('#me').filter({ hasText: 'Signed in as Alice (alice)' }).waitFor(WAIT);
      await alicePage.locator('#banner').waitFor({ state: 'hidden', ...WAIT });

      // Bob pastes a token, on a phone-sized screen.
      await bobPage.goto(gw.url);
      await bobPage.locator('#token-input').fill(await devToken(gw.url, 'bob', 'Bob'));
      await bobPage.locator('#token-form button').click();
      await bobPage.locator('#me').filter({ hasText: 'Signed in as Bob (bob)' }).waitFor(WAIT);
      await bobPage.locator('#banner').waitFor({ state: 'hidden', ...WAIT });

      // Every form control has a label.
      for (const page of [alicePage, bobPage]) {
        const unlabelled = await page.evaluate(() => [...document.querySelectorAll('input, textarea, select')]
          .filter((c) => c.labels.length === 0).map((c) => c.id));
        assert.deepEqual(unlabelled, []);
      }

      // Alice creates a group with Bob; it opens for her and appears in Bob's list.
      await alicePage.locator('#new-conversation summary').click();
      await alicePage.locator('#create-kind').selectOption('group');
      await alicePage.locator('#create-title').fill('Team');
      await alicePage.locator('#create-members').fill('bob');
      await alicePage.locator('#create-form button').click();
      await alicePage.locator('#room-title').filter({ hasText: 'Team' }).waitFor(WAIT);
      const bobEntry = bobPage.locator('#conversations button', { hasText: 'Team' });
      await bobEntry.waitFor(WAIT);

      // Alice sends with Enter: pending → delivered; Bob sees an unread count before opening.
      await alicePage.locator('#composer-input').fill('hello bob');
      await alicePage.locator('#composer-input').press('Enter');
      const aliceFirst = alicePage.locator('#messages li.message[data-seq="1"]');
      await aliceFirst.locator('.status[data-status="delivered"]').waitFor(WAIT);
      assert.equal(await alicePage.locator('#composer-input').inputValue(), '');
      await bobEntry.locator('.unread').filter({ hasText: /^1$/ }).waitFor(WAIT);
      await bobEntry.click();
      await bobPage.locator('#room-title').filter({ hasText: 'Team' }).waitFor(WAIT);
      assert.equal(await bobPage.locator('#sidebar').isVisible(), false, 'phone width shows one pane');
      assert.equal(await bobPage.evaluate(() => document.activeElement.id), 'composer-input');
      const bobFirst = bobPage.locator('#messages li.message[data-seq="1"]');
      assert.equal(await bobFirst.locator('.content').textContent(), 'hello bob');
      assert.equal(await bobFirst.locator('.sender').textContent(), 'Alice');
      // Bob read it: Alice's message turns "read"; Bob's badge is gone.
      await aliceFirst.locator('.status[data-status="read"]').waitFor(WAIT);
      assert.equal(await bobEntry.locator('.unread').count(), 0);
      // Presence: each sees the other online in the member list.
      await alicePage.locator('#members li[data-user-id="bob"] .dot[data-status="online"]').waitFor(WAIT);
      await bobPage.locator('#members li[data-user-id="alice"] .dot[data-status="online"]').waitFor(WAIT);

      // Bob types: Alice sees it; Shift+Enter is a new line, Enter sends and ends typing.
      const bobInput = bobPage.locator('#composer-input');
      await bobInput.pressSequentially('On my way');
      await alicePage.locator('#typing').filter({ hasText: 'Bob is typing…' }).waitFor(WAIT);
      await bobInput.press('Shift+Enter');
      await bobInput.pressSequentially('second line');
      assert.equal(await bobInput.inputValue(), 'On my way\nsecond line');
      await bobInput.press('Enter');
      const aliceSecond = alicePage.locator('#messages li.message[data-seq="2"]');
      await aliceSecond.waitFor(WAIT);
      assert.equal(await aliceSecond.locator('.content').textContent(), 'On my way\nsecond line');
      await alicePage.locator('#typing').filter({ hasText: /^$/ }).waitFor(WAIT);
      await bobPage.locator('#messages li.message[data-seq="2"] .status[data-status="read"]').waitFor(WAIT);

      // Markup is shown as text, never run or rendered.
      const hostile = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"><b>bold</b>';
      await alicePage.locator('#composer-input').fill(hostile);
      await alicePage.locator('#send').click();
      const bobThird = bobPage.locator('#messages li.message[data-seq="3"]');
      await bobThird.waitFor(WAIT);
      assert.equal(await bobThird.locator('.content').textContent(), hostile);
      assert.equal(await bobPage.locator('#messages script, #messages img, #messages b').count(), 0);
      assert.equal(await bobPage.evaluate(() => window.__pwned), undefined);
      assert.equal(await alicePage.evaluate(() => window.__pwned), undefined);

      // Phone width: nothing wider than the screen.
      assert.ok(await bobPage.evaluate(() => document.documentElement.scrollWidth <= 375), 'no horizontal scroll at 375 px');
      await alicePage.screenshot({ path: join(ARTIFACTS, 'alice-desktop.png') });
      await bobPage.screenshot({ path: join(ARTIFACTS, 'bob-phone.png') });

      // Restart the gateway under open pages: the banner says reconnecting. Meanwhile Bob, on
      // another client through another gateway process on the same data, sends messages that no
      // page is connected to receive. Nothing else is sent, so only the page's sync after the
      // reconnect can bring them.
      const port = gw.port;
      const conversationId = await alicePage.evaluate(() => document.querySelector('#conversations button[aria-current="true"]').dataset.conversationId);
      // A stopped gateway drains first: the pages hear `server_draining` and say they are moving.
      await gw.stop();
      for (const page of [alicePage, bobPage]) {
        await page.locator(AWAY).waitFor(WAIT);
      }
      await alicePage.screenshot({ path: join(ARTIFACTS, 'alice-reconnecting.png') });
      await sendElsewhere(dataDir, conversationId, ['missed 1', 'missed 2', 'missed 3'], 4);
      gw = await startDevGateway({ dataDir, port });
      let expected = ['hello bob', 'On my way\nsecond line', hostile, 'missed 1', 'missed 2', 'missed 3'];
      for (const [page, label] of [[alicePage, 'alice'], [bobPage, 'bob']]) {
        await page.locator('#banner').waitFor({ state: 'hidden', timeout: 30000 });
        await page.locator('#messages li.message[data-seq="6"]').waitFor(WAIT);
        assertInOrderOnce(await messageTexts(page), expected, label);
      }

      // Written while the gateway is down: pending, then sent once after the reconnect.
      await gw.stop();
      await alicePage.locator(AWAY).waitFor(WAIT);
      await alicePage.locator('#composer-input').fill('sent while offline');
      await alicePage.locator('#composer-input').press('Enter');
      await alicePage.locator('#messages li.pending .status[data-status="pending"]').waitFor(WAIT);
      gw = await startDevGateway({ dataDir, port });
      expected = [...expected, 'sent while offline'];
      for (const [page, label] of [[alicePage, 'alice'], [bobPage, 'bob']]) {
        await page.locator('#banner').waitFor({ state: 'hidden', timeout: 30000 });
        await page.locator('#messages li.message[data-seq="7"]').waitFor(WAIT);
        assertInOrderOnce(await messageTexts(page), expected, label);
      }
      await alicePage.locator('#messages li.message[data-seq="7"] .status[data-status="read"]').waitFor(WAIT);
      assert.equal(await alicePage.locator('#messages li.pending').count(), 0);

      // A gap while connected: a message committed through another gateway process (no shared
      // bus, so its broadcast never reaches these pages), then a live one. The page sees seq
      // jump and syncs the hole before showing the rest in order.
      await sendElsewhere(dataDir, conversationId, ['through the side door'], 8);
      await bobInput.fill('back online');
      await bobInput.press('Enter');
      expected = [...expected, 'through the side door', 'back online'];
      for (const [page, label] of [[alicePage, 'alice'], [bobPage, 'bob']]) {
        await page.locator('#messages li.message[data-seq="9"]').waitFor(WAIT);
        await page.locator('#messages li.message[data-seq="8"]').waitFor(WAIT);
        assertInOrderOnce(await messageTexts(page), expected, label);
      }

      // Messages that live. Alice edits her first message in the composer; Bob sees the edit.
      await alicePage.locator('#messages li.message[data-seq="1"] button[data-action="edit"]').click();
      assert.equal(await alicePage.locator('#composer-input').inputValue(), 'hello bob');
      await alicePage.locator('#composer-context').filter({ hasText: 'Editing your message' }).waitFor(WAIT);
      await alicePage.locator('#composer-input').fill('hello bob, edited');
      await alicePage.locator('#composer-input').press('Enter');
      const bobEdited = bobPage.locator('#messages li.message[data-seq="1"]');
      await bobEdited.locator('.content').filter({ hasText: /^hello bob, edited$/ }).waitFor(WAIT);
      await bobEdited.locator('.edited').waitFor(WAIT);
      // Bob reacts; Alice sees the count, pressed for Bob only.
      await bobEdited.locator('button.react[data-emoji="👍"]').click();
      const aliceReaction = alicePage.locator('#messages li.message[data-seq="1"] .reaction[data-emoji="👍"]');
      await aliceReaction.filter({ hasText: '👍 1' }).waitFor(WAIT);
      assert.equal(await aliceReaction.getAttribute('aria-pressed'), 'false');
      await bobEdited.locator('.reaction[data-emoji="👍"][aria-pressed="true"]').waitFor(WAIT);
      // Bob's device reported what it received: Alice's message shows the receipt.
      await alicePage.locator('#messages li.message[data-seq="1"] .receipt').waitFor(WAIT);

      // Bob goes back to his list; Alice mentions him with @-completion: his list shows the badge.
      await bobPage.locator('#back').click();
      const bobTeam = bobPage.locator('#conversations button', { hasText: 'Team' });
      await bobTeam.waitFor(WAIT);
      await alicePage.locator('#composer-input').pressSequentially('@b');
      await alicePage.locator('#mention-suggestions button[data-user-id="bob"]').click();
      assert.equal(await alicePage.locator('#composer-input').inputValue(), '@bob ');
      await alicePage.locator('#composer-input').pressSequentially('look at this');
      await alicePage.locator('#composer-input').press('Enter');
      await bobTeam.locator('.mention-badge').filter({ hasText: '@1' }).waitFor(WAIT);
      await bobPage.screenshot({ path: join(ARTIFACTS, 'bob-mention-badge.png') });
      await bobTeam.click();
      const mention = bobPage.locator('#messages li.message.mentions-me', { hasText: '@bob look at this' });
      await mention.waitFor(WAIT);
      assert.equal(await bobTeam.locator('.mention-badge').count(), 0, 'read: the badge is gone');
      // Bob replies with a quote; Alice deletes what he quoted: the quote and the body go.
      await mention.locator('button[data-action="reply"]').click();
      await bobPage.locator('#composer-context').filter({ hasText: 'Replying to Alice' }).waitFor(WAIT);
      await bobInput.fill('will do');
      await bobInput.press('Enter');
      const aliceReply = alicePage.locator('#messages li.message', { hasText: 'will do' });
      await aliceReply.locator('.quote').filter({ hasText: 'Alice: @bob look at this' }).waitFor(WAIT);
      await alicePage.locator('#messages li.message', { hasText: '@bob look at this' }).locator('button[data-action="delete"]').first().click();
      await aliceReply.locator('.quote').filter({ hasText: 'Deleted message' }).waitFor(WAIT);
      await bobPage.locator('#messages li.message.deleted .content').filter({ hasText: 'This message was deleted.' }).waitFor(WAIT);
      assert.equal(await bobPage.locator('#messages', { hasText: 'look at this' }).count(), 0, 'the body is gone from the page');

      await alicePage.screenshot({ path: join(ARTIFACTS, 'alice-desktop.png') });
      await bobPage.screenshot({ path: join(ARTIFACTS, 'bob-phone.png') });
      // Each page at the other width too.
      await alicePage.setViewportSize({ width: 375, height: 740 });
      assert.ok(await alicePage.evaluate(() => document.documentElement.scrollWidth <= 375));
      await alicePage.screenshot({ path: join(ARTIFACTS, 'alice-phone.png') });
      await bobPage.locator('#back').click();
      await bobPage.locator('#conversations button', { hasText: 'Team' }).waitFor(WAIT);
      await bobPage.screenshot({ path: join(ARTIFACTS, 'bob-phone-list.png') });

      assert.deepEqual([...aliceProblems, ...bobProblems], []);
    } finally {
      await gw.stop();
    }
  });

  it('scrolls back through history page by page to the first message', { timeout: 90000 }, async () => {
    const fast = { CONFAB_MESSAGES_PER_SECOND: '1000', CONFAB_MESSAGE_BURST: '1000', CONFAB_EVENTS_PER_SECOND: '1000', CONFAB_EVENT_BURST: '1000' };
    const gw = await startDevGateway({ env: fast });
    try {
      const carol = await devToken(gw.url, 'carol', 'Carol');
      const created = await api(gw.url, carol, 'POST', '/api/conversations', { kind: 'open', title: 'Lobby' });
      assert.equal(created.status, 201);
      const conversationId = created.body.conversation.id;
      const cli = await socketio(gw.url, await devToken(gw.url, 'dave', 'Dave'));
      await cli.request('join_conversation', { conversationId });
      for (let n = 1; n <= 120; n += 1) {
        await cli.request('send_message', { conversationId, content: `line ${n}`, type: 'text', clientMsgId: `h-${n}` });
      }
      cli.close();

      const page = await (await browser.newContext({ viewport: { width: 1280, height: 800 } })).newPage();
      const problems = watch(page, 'carol');
      await page.goto(gw.url);
      await page.locator('#dev-user').fill('carol');
      await page.locator('#dev-name').fill('Carol');
      await page.locator('#dev-form button').click();
      // The only conversation opens by itself at desktop width, on the newest page.
      await page.locator('#messages li.message[data-seq="120"]').waitFor(WAIT);
      const first = await messageTexts(page);
      assert.equal(first.length, 50, 'one page of history');
      assert.equal(first[0].seq, 71);
      for (const expectSeq of [21, 1]) {
        await page.locator('#messages').evaluate((list) => { list.scrollTop = 0; });
        await page.locator(`#messages li.message[data-seq="${expectSeq}"]`).waitFor(WAIT);
      }
      await page.locator('#history-state').filter({ hasText: 'beginning of the conversation' }).waitFor(WAIT);
      const all = await messageTexts(page);
      assert.deepEqual(all.map((m) => m.content), Array.from({ length: 120 }, (_, i) => `line ${i + 1}`));
      assert.deepEqual(all.map((m) => m.seq), Array.from({ length: 120 }, (_, i) => i + 1));
      assert.deepEqual(problems, []);
      await page.context().close();
    } finally {
      await gw.stop();
    }
  });
  it('sends an image from the attach button and both users see its thumbnail and a file chip', { timeout: 90000 }, async () => {
    const gw = await startDevGateway();
    try {
      const aliceToken = await devToken(gw.url, 'alice', 'Alice');
      const created = await api(gw.url, aliceToken, 'POST', '/api/conversations', { kind: 'group', title: 'Photos', members: ['bob'] });
      assert.equal(created.status, 201);
      const pages = [];
      for (const [user, name, tok] of [['alice', 'Alice', aliceToken], ['bob', 'Bob', await devToken(gw.url, 'bob', 'Bob')]]) {
        const page = await (await browser.newContext({ viewport: { width: 1280, height: 800 } })).newPage();
        const problems = watch(page, user);
        await page.goto(gw.url);
        await page.locator('#token-input').fill(tok);
        await page.locator('#token-form button').click();
        await page.locator('#me').filter({ hasText: `Signed in as ${name} (${user})` }).waitFor(WAIT);
        await page.locator('#conversations button', { hasText: 'Photos' }).click();
        await page.locator('#room-title').filter({ hasText: 'Photos' }).waitFor(WAIT);
        pages.push({ page, problems });
      }
      const [alice, bob] = pages;
      // A caption typed first goes with the image.
      await alice.page.locator('#composer-input').fill('the view');
      await alice.page.locator('#attach-input').setInputFiles({ name: 'view.png', mimeType: 'image/png', buffer: png(640, 320) });
      for (const { page } of pages) {
        const item = page.locator('#messages li.message[data-seq="1"]');
        const thumb = item.locator('img.thumbnail');
        await thumb.waitFor(WAIT);
        // Loaded from the server's thumbnail (320 px wide), not the 640 px original.
        await page.waitForFunction((img) => img.complete && img.naturalWidth > 0, await thumb.elementHandle(), WAIT);
        assert.deepEqual(await thumb.evaluate((img) => [img.naturalWidth, img.naturalHeight]), [320, 160]);
        assert.match(await thumb.getAttribute('src'), /^blob:/);
        assert.equal(await item.locator('.file-chip .file-name').textContent(), 'view.png');
        assert.match(await item.locator('.file-chip .file-size').textContent(), /KB|B$/);
        assert.equal(await item.locator('.content').textContent(), 'the view');
      }
      await bob.page.screenshot({ path: join(ARTIFACTS, 'bob-image.png') });
      // A file that is not an image is a chip with its size, and no preview.
      await bob.page.locator('#attach-input').setInputFiles({ name: 'notes.txt', mimeType: 'text/plain', buffer: Buffer.from('x'.repeat(2048)) });
      const chip = alice.page.locator('#messages li.message[data-seq="2"] .file-chip');
      await chip.waitFor(WAIT);
      assert.equal(await chip.locator('.file-name').textContent(), 'notes.txt');
      assert.equal(await chip.locator('.file-size').textContent(), '2.0 KB');
      assert.equal(await alice.page.locator('#messages li.message[data-seq="2"] img').count(), 0);
      // A disguised file is refused with the server's reason, and nothing is sent.
      await alice.page.locator('#attach-input').setInputFiles({ name: 'cat.png', mimeType: 'image/png', buffer: Buffer.from('<html><script>alert(1)</script></html>') });
      await alice.page.locator('#room-error').filter({ hasText: /Could not upload cat.png: .*text\/html/ }).waitFor(WAIT);
      assert.equal(await alice.page.locator('#messages li.message').count(), 2);
      for (const { page, problems } of pages) {
        assert.deepEqual(problems, []);
        await page.context().close();
      }
    } finally {
      await gw.stop();
    }
  });
});
