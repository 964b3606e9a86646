// The page's Socket.IO client (gateway/web/vendor/, embedded in the gateway) must be exactly the
// file of the socket.io-client release pinned here; scripts/vendor-socketio.sh refreshes it.
import { it } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const pinned = require('./package.json').dependencies['socket.io-client'];
const lock = require('./package-lock.json');

it('the vendored socket.io client is byte for byte the pinned npm release', () => {
  assert.match(pinned, /^\d+\.\d+\.\d+$/, 'socket.io-client is pinned to an exact version');
  assert.equal(lock.packages['node_modules/socket.io-client'].version, pinned, 'package-lock agrees with the pin');
  const pkg = new URL('./node_modules/socket.io-client/', import.meta.url);
  assert.equal(JSON.parse(readFileSync(new URL('package.json', pkg))).version, pinned, 'npm ci installed the pinned version');
  const fromPackage = readFileSync(new URL('dist/socket.io.min.js', pkg));
  const vendored = readFileSync(new URL('../../gateway/web/vendor/socket.io.min.js', import.meta.url));
  assert.ok(vendored.toString('utf8', 0, 200).includes(`Socket.IO v${pinned}`), 'vendored file names the pinned version');
  assert.ok(vendored.equals(fromPackage), 'gateway/web/vendor/socket.io.min.js differs from the pinned package: run scripts/vendor-socketio.sh');
});
