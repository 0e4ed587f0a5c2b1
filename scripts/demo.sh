#!/usr/bin/env bash
# Build cove, start the daemon, run a command in a new sandbox through the
# HTTP API, clean up. Needs root (namespaces and cgroups).
set -euo pipefail
cd "$(dirname "$0")/.."
cmd=("$@")
[ ${#cmd[@]} -gt 0 ] || cmd=(uname -a)

cargo build --release --locked -p cove-cli >&2
cove=./target/release/cove
log=$(mktemp)
"$cove" serve >"$log" 2>&1 &
daemon=$!
trap 'kill $daemon 2>/dev/null; wait $daemon 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 100); do
  grep -q "serving on" "$log" && break
  kill -0 $daemon 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.05
done
id=$("$cove" create)
echo "sandbox $id:" >&2
status=0
"$cove" exec "$id" -- "${cmd[@]}" || status=$?
"$cove" rm "$id" >/dev/null
exit $status
