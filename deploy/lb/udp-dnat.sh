#!/usr/bin/env bash
# A UDP load balancer for the CoAP proxies, built the way kube-proxy builds a Service in its
# iptables/nftables modes: DNAT in the kernel, the client's source address and port preserved
# (no SNAT, no masquerade), conntrack keeping every flow on the replica it started on.
#
#   udp-dnat.sh sync  [options] BACKEND_IP...    (re)write the balancer for exactly these replicas
#   udp-dnat.sh watch [options] --backends-dns NAME [--interval S]
#                                                 resolve NAME every S seconds, sync on change
#   udp-dnat.sh show  [options]                   print the table and the conntrack entries
#   udp-dnat.sh flush [options]                   remove the table
#
# options:
#   --vip ADDR        match datagrams to ADDR (a ClusterIP-like address routed to this host);
#                     default: any address of this host (`fib daddr type local`, NodePort-like)
#   --ports LIST      UDP ports, comma separated (default 5683,5684: CoAP and CoAPS); a datagram
#                     keeps its port, so each replica listens on the same ports
#   --spread MODE     hash (default): jhash(ip saddr . udp sport) mod N -- one device flow
#                     (address and port) always maps to the same replica while N is unchanged,
#                     even after its conntrack entry expired (a DTLS session survives a device's
#                     long sleep); random: numgen random mod N, kube-proxy's choice, where only
#                     the conntrack entry keeps a flow in place
#   --seed N          jhash seed (default 0x0c0a9); fixed so that a re-sync does not move flows
#   --table NAME      nftables table (default coap_lb)
#   --gateway ADDR    first `ip route replace default via ADDR` (a container with several
#                     networks: replies to the clients must leave through the client side)
#
# Removing a replica is a sync without it: the map is rewritten in one nft transaction, then the
# conntrack entries that point at the removed replica are deleted (`conntrack -D --dst-nat IP`,
# what kube-proxy does for stale UDP endpoints), so that the next datagram of those flows is
# balanced again instead of following a stale entry to a dead replica. Flows on the remaining
# replicas keep their entries and stay where they are (their DTLS sessions live there).
#
# The previous set of replicas is read back from the table itself (set @backends), so the
# script keeps no state of its own. Replicas must route their replies through this host
# (default route via it): the reverse translation happens here. Needs nft (nftables), conntrack
# (conntrack-tools), CAP_NET_ADMIN and net.ipv4.ip_forward=1. Used as is by compose.yaml
# (service udp-lb) and by tests/integration/test_topology.py.
set -euo pipefail

vip=""
ports="5683,5684"
spread="hash"
seed="0x0c0a9"
table="coap_lb"
gateway=""
dns_name=""
interval="2"

die() {
    echo "udp-dnat: $*" >&2
    exit 2
}
log() { echo "udp-dnat: $*" >&2; }

command="${1:-}"
[ -n "$command" ] || die "usage: udp-dnat.sh sync|watch|show|flush [options] [BACKEND_IP...]"
shift
backends=()
while [ $# -gt 0 ]; do
    case "$1" in
    --vip) vip="$2"; shift 2 ;;
    --ports) ports="$2"; shift 2 ;;
    --spread) spread="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    --table) table="$2"; shift 2 ;;
    --gateway) gateway="$2"; shift 2 ;;
    --backends-dns) dns_name="$2"; shift 2 ;;
    --interval) interval="$2"; shift 2 ;;
    --*) die "unknown option $1" ;;
    *) backends+=("$1"); shift ;;
    esac
done
case "$spread" in hash | random) ;; *) die "--spread is hash or random, not $spread" ;; esac
[[ "$ports" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--ports: comma-separated port numbers"
for ip in "${backends[@]}" ${vip:+"$vip"}; do
    [[ "$ip" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "not an IPv4 address: $ip"
done

if [ -n "$vip" ]; then match="ip daddr $vip"; else match="fib daddr type local"; fi

# The replicas the table sends to now (empty when there is no table yet).
current_backends() {
    nft list set ip "$table" backends 2>/dev/null |
        sed -n '/elements/,/}/p' | tr -c '0-9.\n' ' ' | tr ' ' '\n' | grep -E '^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$' |
        sort -u || true
}

ruleset() {
    local n=${#backends[@]} i elements="" map=""
    for i in "${!backends[@]}"; do
        elements+="${elements:+, }${backends[$i]}"
        map+="${map:+, }$i : ${backends[$i]}"
    done
    local pick
    if [ "$spread" = hash ]; then
        pick="jhash ip saddr . udp sport mod $n seed $seed"
    else
        pick="numgen random mod $n"
    fi
    # "table; delete table; table {...}" in one file: nft applies it as one transaction, so
    # no datagram ever meets a half-written balancer.
    echo "table ip $table"
    echo "delete table ip $table"
    echo "table ip $table {"
    if [ -n "$elements" ]; then elements="elements = { $elements }"; fi
    echo "  set backends { type ipv4_addr; $elements }"
    echo "  chain prerouting {"
    echo "    type nat hook prerouting priority dstnat; policy accept;"
    if [ "$n" -gt 0 ]; then
        echo "    $match udp dport { $ports } dnat to $pick map { $map }"
    fi
    echo "  }"
    if [ "$n" -eq 0 ]; then
        # No replica: refuse at once (ICMP port unreachable) rather than let datagrams wander.
        echo "  chain refuse {"
        echo "    type filter hook prerouting priority dstnat - 10; policy accept;"
        echo "    $match udp dport { $ports } reject"
        echo "  }"
    fi
    echo "}"
}

sync_backends() {
    local before removed ip
    before=$(current_backends)
    mapfile -t backends < <(printf '%s\n' "${backends[@]}" | grep -v '^$' | sort -u)
    ruleset | nft -f -
    for ip in $before; do
        if ! printf '%s\n' "${backends[@]}" | grep -qxF "$ip"; then
            removed=$(conntrack -D -p udp ${vip:+--orig-dst "$vip"} --dst-nat "$ip" 2>&1 >/dev/null |
                grep -oE '[0-9]+ flow entries' || true)
            log "removed $ip (${removed:-0 flow entries} deleted)"
        fi
    done
    log "backends: ${backends[*]:-none} (spread $spread, ports $ports, ${vip:-local addresses})"
}

resolve() {
    # Every address the name has (compose/Docker DNS returns one A record per running replica).
    getent ahostsv4 "$1" | awk '{print $1}' | sort -u || true
}

if [ -n "$gateway" ]; then
    ip route replace default via "$gateway"
fi

case "$command" in
sync)
    sync_backends
    ;;
watch)
    [ -n "$dns_name" ] || die "watch needs --backends-dns NAME"
    trap 'exit 0' TERM INT
    last="-"
    empty=0
    while true; do
        mapfile -t backends < <(resolve "$dns_name")
        now="${backends[*]:-}"
        # No answer at all may be a DNS hiccup: only the third empty answer in a row empties
        # the balancer (kube-proxy, too, keeps its rules when it loses the API server).
        if [ -z "$now" ] && [ "$last" != "-" ]; then empty=$((empty + 1)); else empty=0; fi
        if [ "$now" != "$last" ] && { [ -n "$now" ] || [ "$last" = "-" ] || [ "$empty" -ge 3 ]; }; then
            sync_backends
            last="$now"
        fi
        sleep "$interval" &
        wait $! || true
    done
    ;;
show)
    nft list table ip "$table"
    conntrack -L -p udp ${vip:+--orig-dst "$vip"} 2>/dev/null || true
    ;;
flush)
    nft delete table ip "$table" 2>/dev/null || true
    ;;
*)
    die "unknown command $command"
    ;;
esac
