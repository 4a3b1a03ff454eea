#!/usr/bin/env bash
# Peer baseline for the licence server: redis-server (Debian's) on loopback, INCR then DECR of one
# counter (a take and a give-back, like an access and its release) with 1, 16 and 64 clients.
# Writes reports/bench/redis-baseline.json with our server's access+release pairs per second (from
# reports/bench/server.json, written by `cargo run --release -p meterd --example server-bench`)
# as a ratio to redis's INCR+DECR pairs per second. Starts redis itself and stops it on exit.
# A second redis, with every write appended and fsynced before it is answered (appendfsync
# always), is measured in the same run as the like-for-like peer of a server that logs every
# grant and release durably (usage_log_durable_ratio); the goal is on the first, with our
# server's seats alone (network seats are leases: no disk write; see docs/runtime-contract.md).
set -euo pipefail

out_dir=${1:-reports/bench}
ours=$out_dir/server.json
out=$out_dir/redis-baseline.json
clients_levels=(1 16 64)

for tool in redis-server redis-benchmark redis-cli; do
  command -v "$tool" >/dev/null || { echo "redis-baseline: $tool missing: run \`make deps\` (as root)" >&2; exit 2; }
done
[ -f "$ours" ] || { echo "redis-baseline: no $ours: run the server bench first" >&2; exit 2; }

port=$((20000 + RANDOM % 20000))
durable_port=$((port + 1))
work=$(mktemp -d)
mkdir -p "$work/plain" "$work/durable"
redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no --dir "$work/plain" \
  --logfile "$work/plain/redis.log" &
redis_pid=$!
redis-server --bind 127.0.0.1 --port "$durable_port" --save '' --appendonly yes \
  --appendfsync always --dir "$work/durable" --logfile "$work/durable/redis.log" &
durable_pid=$!
cleanup() {
  kill "$redis_pid" "$durable_pid" 2>/dev/null || true
  wait "$redis_pid" "$durable_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
for p in "$port" "$durable_port"; do
  for _ in $(seq 50); do
    redis-cli -h 127.0.0.1 -p "$p" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
  redis-cli -h 127.0.0.1 -p "$p" ping >/dev/null
done

# Requests per second of one command at a client count on a port (redis-benchmark --csv:
# "test","rps",...).
rps_on() {
  local on=$1 clients=$2 requests=$3; shift 3
  redis-benchmark -h 127.0.0.1 -p "$on" -c "$clients" -n "$requests" --csv "$@" |
    awk -F'"' 'NR == 2 { print $4 }'
}
rps() {
  local clients=$1; shift
  rps_on "$port" "$clients" $((clients == 1 ? 100000 : 300000)) "$@"
}
# The durable peer syncs every write: fewer requests keep its run as short.
durable_rps() {
  local clients=$1; shift
  rps_on "$durable_port" "$clients" $((clients == 1 ? 5000 : 30000)) "$@"
}

# Our pairs per second for a client count, from a section of server.json (no jq needed).
ours_pps() {
  local section=$1 clients=$2
  tr -d ' \n' < "$ours" | grep -o "\"$section\":\[[^]]*\]" |
    grep -o "{[^{}]*\"clients\":$clients,[^{}]*}" |
    grep -o '"pairs_per_second":[0-9.eE+-]*' | cut -d: -f2
}

entries=()
for clients in "${clients_levels[@]}"; do
  incr=$(rps "$clients" INCR vigil:licences)
  decr=$(rps "$clients" DECR vigil:licences)
  durable_incr=$(durable_rps "$clients" INCR vigil:licences)
  durable_decr=$(durable_rps "$clients" DECR vigil:licences)
  protocol=$(ours_pps server_protocol "$clients")
  logged=$(ours_pps server_protocol_usage_log "$clients")
  end_to_end=$(ours_pps end_to_end "$clients")
  entries+=("$(awk -v c="$clients" -v i="$incr" -v d="$decr" -v di="$durable_incr" -v dd="$durable_decr" -v p="${protocol:-0}" -v l="${logged:-0}" -v e="${end_to_end:-0}" 'BEGIN {
    pair = 1 / (1 / i + 1 / d);
    durable = 1 / (1 / di + 1 / dd);
    printf "{\"clients\": %d, \"redis_incr_per_second\": %.1f, \"redis_decr_per_second\": %.1f, \"redis_pairs_per_second\": %.1f, \"ours_pairs_per_second\": %.1f, \"ratio\": %.3f, \"ours_usage_log_pairs_per_second\": %.1f, \"usage_log_ratio\": %.3f, \"usage_log_durable_ratio\": %.3f, \"ours_end_to_end_pairs_per_second\": %.1f, \"end_to_end_ratio\": %.3f, \"redis_durable_pairs_per_second\": %.1f, \"durable_ratio\": %.3f}", c, i, d, pair, p, p / pair, l, l / pair, l / durable, e, e / pair, durable, p / durable }')")
  echo "redis-baseline: ${entries[-1]}" >&2
done

version=$(redis-server --version | awk '{ print $3 }' | cut -d= -f2)
{
  printf '{\n  "peer": "redis-server %s on 127.0.0.1, INCR+DECR of one key (redis-benchmark)",\n' "$version"
  printf '  "durable_peer": "the same with appendonly yes, appendfsync always (each write fsynced before its answer)",\n'
  printf '  "ours": "meterd network server, access+release pairs, seats only, usage log off (server_protocol of %s); usage_log: the server as shipped, each grant and release logged and synced before its answer (its like-for-like peer is the durable one: usage_log_durable_ratio); end_to_end goes through a local meterd",\n' "$ours"
  printf '  "goal": {"ratio_at_16": 0.45, "ratio_at_64": 0.45},\n'
  printf '  "machine": {"cpus": %d},\n' "$(nproc)"
  printf '  "levels": [\n    %s\n  ]\n}\n' "$(IFS=$'\n'; echo "${entries[*]}" | paste -sd, | sed 's/},{/},\n    {/g')"
} > "$out"
echo "redis-baseline: wrote $out" >&2
