#!/usr/bin/env bash
# Refreshes the web page's Socket.IO client from the npm package pinned in tests/js/package.json
# (gateway/web/vendor/socket.io.min.js is embedded in the gateway binary). To move to a new
# release: change the pin, `npm install` in tests/js, then run this. tests/js/vendor.test.mjs
# fails while the committed copy differs from the pinned package's file.
set -euo pipefail
cd "$(dirname "$0")/.."
(cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
src=tests/js/node_modules/socket.io-client/dist/socket.io.min.js
pinned=$(node -p "require('./tests/js/package.json').dependencies['socket.io-client']")
installed=$(node -p "require('./tests/js/node_modules/socket.io-client/package.json').version")
if [ "$pinned" != "$installed" ]; then
  echo "socket.io-client $installed is installed but $pinned is pinned; run npm install in tests/js" >&2
  exit 1
fi
mkdir -p gateway/web/vendor
cp "$src" gateway/web/vendor/socket.io.min.js
echo "gateway/web/vendor/socket.io.min.js is socket.io-client $pinned"
