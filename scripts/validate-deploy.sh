#!/usr/bin/env bash
# Checks the deployment files under deploy/ without a cluster or a container engine:
#   1. Kubernetes manifests: strict schema validation (kubernetes-validate, from a venv in
#      target/deploy-venv or $DEPLOY_VENV) against pinned Kubernetes versions, plus
#      consistency between the files (names, metric names, grace period vs. drain time).
#   2. HAProxy: `haproxy -c` on deploy/haproxy/haproxy.cfg, then the configuration is run
#      against three stub replicas on loopback ports to check affinity (X-Session-Id and
#      the `user` field), round robin without a key, retry of a draining replica's 503,
#      health-check removal and return, and unbuffered streaming.
#   3. deploy/entrypoint.sh: POSIX sh syntax (and shellcheck when installed).
# A check whose tool cannot be had (offline, not root) is skipped with a SKIP line on
# stderr; any real failure makes the script exit non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSIONS="1.30.0 1.37.0"
KUBERNETES_VALIDATE="kubernetes-validate==1.37.0"
venv=${DEPLOY_VENV:-target/deploy-venv}

failures=0
fail() { echo "FAIL: $*" >&2; failures=$((failures + 1)); }
skip() { echo "SKIP: $* ***" >&2; }
ok() { echo "ok: $*"; }

# ---- 1. Kubernetes ---------------------------------------------------------------------
check_kubernetes() {
  if ! "$venv/bin/python" -c 'import kubernetes_validate, yaml' 2>/dev/null; then
    if ! python3 -m venv "$venv" >/dev/null 2>&1 ||
      ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "$KUBERNETES_VALIDATE" >/dev/null 2>&1; then
      skip "could not install $KUBERNETES_VALIDATE into $venv (offline?): Kubernetes manifests NOT validated"
      return
    fi
  fi
  local py="$venv/bin/python"
  # Custom resources and kustomize's own file have no schema in kubernetes-validate:
  # those are only parsed (and cross-checked below).
  local plain=() f
  for f in deploy/kubernetes/*.yaml; do
    if grep -qE '^apiVersion: *(keda\.sh|monitoring\.coreos\.com|kustomize\.config\.k8s\.io)/' "$f"; then
      echo "note: $f is a custom resource or kustomize file: parsed, not schema-checked"
    else
      plain+=("$f")
    fi
  done
  local v
  for v in $K8S_VERSIONS; do
    if "$venv/bin/kubernetes-validate" --strict --quiet -k "$v" "${plain[@]}"; then
      ok "${#plain[@]} manifests valid (strict) for Kubernetes $v"
    else
      fail "manifests do not validate for Kubernetes $v"
    fi
  done
  if "$py" - <<'EOF'; then ok "manifests consistent with each other"; else fail "manifests inconsistent"; fi
import glob, os, re, sys, yaml

docs = {}
for path in sorted(glob.glob("deploy/kubernetes/*.yaml")):
    with open(path) as f:
        loaded = [d for d in yaml.safe_load_all(f) if d is not None]
    if len(loaded) != 1:
        sys.exit(f"{path}: expected one document, found {len(loaded)}")
    docs[os.path.basename(path)] = loaded[0]
errors = []
def check(cond, msg):
    if not cond:
        errors.append(msg)

kust = docs["kustomization.yaml"]
for r in kust["resources"]:
    check(r in docs, f"kustomization.yaml lists {r}, which does not exist")
    check(r not in ("keda-scaledobject.yaml", "podmonitor.yaml"),
          f"kustomization.yaml lists {r}, whose CRD a cluster may lack")

cm = docs["configmap.yaml"]["data"]
dep = docs["deployment.yaml"]
spec = dep["spec"]["template"]["spec"]
(server,) = [c for c in spec["containers"] if c["name"] == "gemma3"]
args = dict(a[2:].split("=", 1) for a in server["args"])
shutdown = int(args["shutdown-timeout"])
pre_stop = int(server["lifecycle"]["preStop"]["exec"]["command"][1])
grace = spec["terminationGracePeriodSeconds"]
check(grace >= pre_stop + shutdown + 5,
      f"terminationGracePeriodSeconds {grace} < preStop {pre_stop} + shutdown {shutdown} + 5")
check(args["replica-id"] == "$(POD_NAME)", "--replica-id is not the pod name")
env = {e["name"]: e for e in server["env"]}
check(env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", "POD_NAME")
check(server["readinessProbe"]["httpGet"]["path"] == "/health", "readiness probe path")
check(server["startupProbe"]["httpGet"]["path"] == "/health", "startup probe path")
check(server["livenessProbe"]["httpGet"]["path"] == "/live", "liveness probe path")
labels = dep["spec"]["template"]["metadata"]["labels"]
for name in ("service.yaml", "pdb.yaml"):
    sel = docs[name]["spec"]["selector"]
    sel = sel.get("matchLabels", sel)
    check(all(labels.get(k) == v for k, v in sel.items()), f"{name} selector misses the pods")
check(docs["service.yaml"]["spec"]["ports"][0]["targetPort"] in
      [p["name"] for p in server["ports"]], "service targetPort")

# The HPA's metric is what the adapter rule exposes; KEDA's query names the alias.
rules = yaml.safe_load(docs["prometheus-adapter-rules.yaml"]["data"]["config.yaml"])["rules"]
exposed = set()
for rule in rules:
    series = re.match(r"[\w:]+", rule["seriesQuery"].strip("'\"")).group(0)
    m = re.match(rule["name"]["matches"], series)
    exposed.add(re.sub(r"\$\{(\d+)\}", lambda g: m.group(int(g.group(1))), rule["name"]["as"]))
for metric in docs["hpa.yaml"]["spec"]["metrics"]:
    check(metric["pods"]["metric"]["name"] in exposed,
          f"HPA metric {metric['pods']['metric']['name']} not among the adapter's {sorted(exposed)}")
query = docs["keda-scaledobject.yaml"]["spec"]["triggers"][0]["metadata"]["query"]
check(f'model_name="{cm["GEMMA3_ALIAS"]}"' in query, "KEDA query does not name GEMMA3_ALIAS")
for name in ("hpa.yaml", "keda-scaledobject.yaml"):
    check(docs[name]["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"],
          f"{name} scales something else")

for e in errors:
    print("  " + e, file=sys.stderr)
sys.exit(1 if errors else 0)
EOF
}

# ---- 2. HAProxy ------------------------------------------------------------------------
check_haproxy() {
  local cfg=deploy/haproxy/haproxy.cfg
  if ! command -v haproxy >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "installing haproxy with apt-get"
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy; } \
        >/dev/null 2>&1 || true
    fi
  fi
  if ! command -v haproxy >/dev/null; then
    skip "haproxy is not installed and could not be: $cfg NOT checked"
    return
  fi
  echo "using $(haproxy -v | head -n 1)"
  if haproxy -q -c -f "$cfg"; then
    ok "haproxy -c $cfg"
  else
    fail "haproxy -c $cfg"
    return
  fi
  if haproxy_behaviour "$cfg"; then
    ok "haproxy.cfg behaves as intended against stub replicas"
  else
    fail "haproxy.cfg against stub replicas (log above)"
  fi
}

# Runs the configuration, with its addresses moved to free loopback ports, in front of
# three stub replicas (Python, standard library only).
hb_tmp=""
hb_pids=()
haproxy_behaviour_cleanup() {
  local p
  for p in "${hb_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${hb_pids[@]}"; do wait "$p" 2>/dev/null || true; done
  hb_pids=()
  if [ -n "$hb_tmp" ]; then rm -rf "$hb_tmp"; fi
  hb_tmp=""
}
haproxy_behaviour() {
  local cfg=$1
  hb_tmp=$(mktemp -d)
  hb_pids=()
  trap haproxy_behaviour_cleanup EXIT
  local tmp=$hb_tmp
  local ports
  ports=$(python3 -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')
  read -r p0 p1 p2 p3 <<<"$ports"
  sed -e "s/127\.0\.0\.1:8080\b/127.0.0.1:$p0/" -e "s/127\.0\.0\.1:8081\b/127.0.0.1:$p1/" \
    -e "s/127\.0\.0\.1:8082\b/127.0.0.1:$p2/" -e "s/127\.0\.0\.1:8083\b/127.0.0.1:$p3/" \
    "$cfg" >"$tmp/haproxy.cfg"
  mkdir "$tmp/state"
  cat >"$tmp/stub.py" <<'EOF'
# Three stand-ins for `gemma3 serve`: /health, /live, and POSTs answered with the
# replica's id. A file state/<id> holding "reject" makes POSTs answer 503 (a replica
# that just began draining); "drain" also makes /health answer 503.
import json, os, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

state_dir = sys.argv[1]

class Replica(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def state(self):
        try:
            with open(os.path.join(state_dir, self.server.replica)) as f:
                return f.read().strip()
        except FileNotFoundError:
            return ""

    def reply(self, status, body, extra=()):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Replica-Id", self.server.replica)
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            ok = self.state() != "drain"
            self.reply(200 if ok else 503, {"status": "ok" if ok else "draining"})
        elif self.path == "/live":
            self.reply(200, {"status": "ok"})
        else:
            self.reply(404, {"error": "not found"})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.state() in ("reject", "drain"):
            self.reply(503, {"error": "draining"}, [("Retry-After", "1")])
            return
        if self.path == "/v1/stream":
            # Server-sent events, as a token stream: one every 50 ms.
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("X-Replica-Id", self.server.replica)
            self.end_headers()
            for i in range(10):
                if i:
                    time.sleep(0.05)
                event = f"data: {i}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            return
        self.reply(200, {"replica": self.server.replica, "bytes": len(body)})

for i, port in enumerate(sys.argv[2:], 1):
    server = ThreadingHTTPServer(("127.0.0.1", int(port)), Replica)
    server.replica = f"replica{i}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
print("stubs up", flush=True)
threading.Event().wait()
EOF
  cat >"$tmp/client.py" <<'EOF'
# Drives HAProxy and checks what the replicas saw.
import http.client, json, os, sys, time

port = int(sys.argv[1])
state_dir = sys.argv[2]

# One keep-alive connection for the sequential requests: HAProxy has finished each
# request before it reads the next, so none is still counted as load when the next is
# balanced (with the bounded-load hash, a leftover one could move a key elsewhere).
conn = None

def post(path="/v1/chat/completions", session=None, user=None):
    global conn
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    if user is not None:
        body["user"] = user
    headers = {"Content-Type": "application/json"}
    if session is not None:
        headers["X-Session-Id"] = session
    for attempt in range(2):
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("POST", path, json.dumps(body), headers)
            r = conn.getresponse()
            r.read()
            return r.status, r.getheader("X-Replica-Id")
        except (ConnectionError, http.client.HTTPException):
            conn.close()
            conn = None
            if attempt:
                raise

def wait_for(what, cond, timeout=15):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.2)
    sys.exit(f"timed out waiting for {what}")

def set_state(replica, s):
    path = os.path.join(state_dir, replica)
    if s:
        with open(path, "w") as f:
            f.write(s)
    elif os.path.exists(path):
        os.remove(path)

# All three replicas up (health checks passed).
seen = set()
def all_up():
    status, rid = post()
    if status == 200:
        seen.add(rid)
    return len(seen) == 3
wait_for("all three replicas to serve", all_up)

# Affinity on X-Session-Id: each key sticks to one replica; keys spread over replicas.
keys = [f"session-{i}" for i in range(12)]
home = {}
for k in keys:
    got = {post(session=k) for _ in range(4)}
    assert len(got) == 1 and all(s == 200 for s, _ in got), (k, got)
    home[k] = got.pop()[1]
assert len(set(home.values())) >= 2, f"all keys on one replica: {home}"

# The body's "user" field is the same key as the header.
for k in keys:
    assert {post(user=k) for _ in range(3)} == {(200, home[k])}, k
# The header wins over the field.
k0 = keys[0]
other = next(k for k in keys if home[k] != home[k0])
assert post(session=k0, user=other) == (200, home[k0])

# A body larger than HAProxy's buffer (an image, a long history) still goes through whole.
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
big = json.dumps({"messages": [{"role": "user", "content": "x" * 300_000}]})
conn.request("POST", "/v1/chat/completions", big, {"X-Session-Id": k0})
r = conn.getresponse()
assert r.status == 200 and json.loads(r.read())["bytes"] == len(big), r.status
conn.close()

# No key: round robin over the replicas.
assert len({post()[1] for _ in range(6)}) >= 2, "no-key requests not spread"

# A replica that answers 503 (draining, not yet marked down): its sessions' requests
# are retried elsewhere and the client never sees the 503.
victim = home[k0]
set_state(victim, "reject")
for _ in range(5):
    status, rid = post(session=k0)
    assert status == 200 and rid != victim, (status, rid)
set_state(victim, "")

# /health 503: the replica is taken out, and comes back (with its keys) when healthy.
set_state(victim, "drain")
time.sleep(3.5)  # fall 2 x inter 1s, with margin
assert all(post(session=k)[1] != victim for k in keys)
set_state(victim, "")
wait_for("the replica to come back", lambda: post(session=k0) == (200, victim))

# Stream events are forwarded as they come (10 events 50 ms apart), not held back and
# sent in bursts: count the events that arrived at least 25 ms after the one before.
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
start = time.time()
conn.request("POST", "/v1/stream", "{}", {"Content-Type": "application/json"})
r = conn.getresponse()
arrivals = []
while line := r.readline():
    if line.startswith(b"data: "):
        arrivals.append(time.time() - start)
assert len(arrivals) == 10, arrivals
spaced = sum(b - a >= 0.025 for a, b in zip(arrivals, arrivals[1:]))
times = ", ".join(f"{t:.3f}" for t in arrivals)
assert spaced >= 6, f"stream events arrived in bursts at {times} s"
print(f"affinity over {len(set(home.values()))} replicas, retry, health removal and "
      f"return, streaming ({spaced}/9 events spaced): all as intended")
EOF
  python3 "$tmp/stub.py" "$tmp/state" "$p1" "$p2" "$p3" >"$tmp/stub.log" 2>&1 &
  hb_pids+=($!)
  haproxy -db -f "$tmp/haproxy.cfg" >"$tmp/haproxy.log" 2>&1 &
  hb_pids+=($!)
  local rc=0
  timeout 120 python3 "$tmp/client.py" "$p0" "$tmp/state" || rc=$?
  if [ "$rc" != 0 ]; then
    echo "--- haproxy log (last lines)" >&2
    tail -n 30 "$tmp/haproxy.log" >&2 || true
    echo "--- stub log" >&2
    tail -n 30 "$tmp/stub.log" >&2 || true
  fi
  haproxy_behaviour_cleanup
  return "$rc"
}

# ---- 3. Entry point --------------------------------------------------------------------
check_entrypoint() {
  if sh -n deploy/entrypoint.sh; then
    ok "sh -n deploy/entrypoint.sh"
  else
    fail "sh -n deploy/entrypoint.sh"
  fi
  if command -v shellcheck >/dev/null; then
    if shellcheck -s sh deploy/entrypoint.sh; then
      ok "shellcheck deploy/entrypoint.sh"
    else
      fail "shellcheck deploy/entrypoint.sh"
    fi
  fi
  [ -x deploy/entrypoint.sh ] || fail "deploy/entrypoint.sh is not executable"
}

check_kubernetes
check_haproxy
check_entrypoint
if [ "$failures" -gt 0 ]; then
  echo "validate-deploy: $failures check(s) failed" >&2
  exit 1
fi
echo "validate-deploy: all checks passed"
