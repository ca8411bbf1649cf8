#!/usr/bin/env bash
# A new user's first run, as the README tells it: clone the repository into a temporary folder,
# `make demo` there (make setup from requirements.lock included), then `make ui` on the store the
# demo wrote: started on a free loopback port, asked over HTTP for the demo's experiments and the
# selector run's metrics, stopped. Prints the time of each step and the machine's load.
# .ci/run calls it after `make test`; by hand: bash .ci/new_user.sh (the committed HEAD is cloned).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/biomedvital-new-user.XXXXXX")"
ui_pid=""
cleanup() {
  if [ -n "$ui_pid" ]; then kill -TERM -- "-$ui_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "new user: load before: $(uptime)"
start=$(date +%s)
git clone --quiet "$repo" "$work/biomedvital"
cd "$work/biomedvital"
make demo
demo_done=$(date +%s)

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
setsid make ui UI_PORT="$port" > "$work/ui.log" 2>&1 &
ui_pid=$!
if ! .venv/bin/python - "$port" <<'EOF'
"""The UI answers and lists the demo's experiments and the selector run's metrics."""
import json
import sys
import time
import urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}"


def ask(path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read().decode()


deadline = time.monotonic() + 240
while True:
    try:
        ask("/health")
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("make ui: no answer within 240 s")
        time.sleep(1)
experiments = json.loads(ask("/api/2.0/mlflow/experiments/search", {"max_results": 100}))
ids = {e["name"]: e["experiment_id"] for e in experiments["experiments"]}
missing = {"generation", "rating", "selection", "tuning", "evaluation"} - set(ids)
if missing:
    sys.exit(f"make ui: experiments missing: {sorted(missing)} (listed: {sorted(ids)})")
runs = json.loads(ask("/api/2.0/mlflow/runs/search", {"experiment_ids": [ids["selection"]]}))
metrics = {m["key"] for r in runs.get("runs", []) for m in r["data"].get("metrics", [])}
if "val/align_rate" not in metrics:
    sys.exit(f"make ui: the selector run's metrics are not listed (got {sorted(metrics)})")
if "<html" not in ask("/").lower():
    sys.exit("make ui: the web page is not served")
print(f"make ui: {len(ids)} experiments, selector metrics {sorted(metrics)}")
EOF
then
  echo "make ui failed; its log:" >&2
  cat "$work/ui.log" >&2
  exit 1
fi
kill -TERM -- "-$ui_pid"
wait "$ui_pid" 2>/dev/null || true
ui_pid=""
done_at=$(date +%s)
echo "new user: make demo (fresh clone, setup included) $((demo_done - start)) s;" \
  "make ui check $((done_at - demo_done)) s; load after: $(uptime)"
