#!/usr/bin/env bash
# Install the Debian packages given as arguments when they are missing.
# As root with apt-get: installs them (one `apt-get update` first). Otherwise: names the missing
# ones and exits 1, so `make test` fails with a clear instruction instead of an obscure error.
set -euo pipefail
missing=()
for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Debian starts services on install; the tests start their own throwaway instances and
    # must not depend on (or collide with) these, so nothing else is done with them.
    exit 0
fi
echo "missing Debian packages: ${missing[*]}" >&2
echo "install them with: sudo apt-get install ${missing[*]}" >&2
exit 1
