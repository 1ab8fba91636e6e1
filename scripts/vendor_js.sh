#!/bin/sh
# Install socket.io-client from package.json (exactly as locked) and copy its ES module build into
# service/static/vendor/, where the page imports it from. Nothing is fetched at run time.
set -eu
cd "$(dirname "$0")/.."

if [ -f package-lock.json ]; then
    npm ci --no-audit --no-fund
else
    npm install --no-audit --no-fund
fi

src=node_modules/socket.io-client/dist
dest=service/static/vendor
mkdir -p "$dest"
cp "$src/socket.io.esm.min.js" "$dest/"
if [ -f "$src/socket.io.esm.min.js.map" ]; then
    cp "$src/socket.io.esm.min.js.map" "$dest/"
fi
echo "vendored socket.io-client $(node -p 'require("./node_modules/socket.io-client/package.json").version') into $dest"
