#!/usr/bin/env bash
# Build DTLSSocket 0.2.3 (tinydtls 0.8.6 inside) with our changes into a Python environment.
#
# Usage: scripts/install-dtlssocket.sh PYTHON
#
# scripts/patches/, applied in this order:
# - alert-double-delete: tinydtls 0.8.6 as published removes a peer from its hash table twice
#   when the peer sends close_notify or a fatal alert (handle_alert, then dtls_destroy_peer).
#   The table's counts go wrong and a later handshake divides by zero (SIGFPE) inside uthash:
#   any client that runs a few handshakes at once and closes them cleanly can crash the proxy.
#   The same fault is reported as eclipse-tinydtls/tinydtls#269 (2026-05).
# - psk-64-bytes: tinydtls takes PSKs of at most 16 bytes (DTLS_PSK_MAX_KEY_LEN), and
#   DTLSSocket copies the key into that buffer without checking its length. Managed-PSK
#   devices present a 64-byte key (32 random bytes written as 64 hex characters, given to
#   libcoap's -k as text; docs/API.md, "Credentials"). The patch builds with
#   DTLS_PSK_MAX_KEY_LEN=64, sizes the buffer that holds the PSK pre_master_secret
#   (RFC 4279 §2: 2 + N + 2 + N bytes) to match, and makes DTLSSocket refuse a key longer than
#   tinydtls' buffer instead of overflowing it, on the server and the client side alike.
# - connection-id: RFC 9146 Connection ID on the server side, which tinydtls 0.8.6 lacks. A
#   ClientHello's connection_id extension (54) is answered with an 8-byte CID of the server's
#   own (fixed length, so a tls12_cid record header has a known size) when the application
#   enables it (dtls_user_parameters_t.support_connection_id); protected records carry CIDs
#   as tls12_cid (25) records with the RFC's additional data and inner content type. DTLSSocket
#   gains peerCid, peerReadSequence, rebind (move a peer to a new address), exportPeer and
#   importPeer (a connected peer's record state as a versioned blob) for the proxy's routing by
#   CID (proxy/transports/dtls.py; docs/ARCHITECTURE.md, "DTLS").
# The build is versioned 0.2.3+coapbridge.3; proxy/transports/dtls.py refuses coaps without it.
set -euo pipefail
PY=${1:?usage: $0 PYTHON}
WANT=0.2.3+coapbridge.3
SDIST_SHA256=f06cbe32df8562dbbccbe274aaf27d2773e8492a86c41c334b3a0a70a50037cf
here=$(cd "$(dirname "$0")" && pwd)

have=$("$PY" -c 'import importlib.metadata as m; print(m.version("DTLSSocket"))' 2>/dev/null || true)
[ "$have" = "$WANT" ] && exit 0

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --no-deps --no-binary DTLSSocket DTLSSocket==0.2.3 -d "$work" 2>/dev/null
sdist="$work/dtlssocket-0.2.3.tar.gz"
echo "$SDIST_SHA256  $sdist" | sha256sum -c --quiet -
tar xzf "$sdist" -C "$work"
fixes=(alert-double-delete psk-64-bytes connection-id)
# A patch added to scripts/patches/ but not to the list above would silently not be applied.
for patch in "$here"/patches/*.patch; do
    name=${patch##*/dtlssocket-0.2.3-}
    [[ " ${fixes[*]} " == *" ${name%.patch} "* ]] || { echo "$patch is not in fixes=()" >&2; exit 1; }
done
for fix in "${fixes[@]}"; do
    (cd "$work/dtlssocket-0.2.3" && patch -s -p1 < "$here/patches/dtlssocket-0.2.3-$fix.patch")
done
echo "building DTLSSocket $WANT (tinydtls with the alert double-delete fix, 64-byte PSKs and Connection ID)"
# setuptools' deprecation warnings about the package's own metadata would bury real errors:
# the build's output is shown only if it fails.
if ! "$PY" -m pip install -q "$work/dtlssocket-0.2.3" >"$work/build.log" 2>&1; then
    cat "$work/build.log" >&2
    exit 1
fi
