#!/usr/bin/env bash
# End to end on a real cluster, for anyone with Docker and kind:
#   1. creates a kind cluster, builds the image and loads it into the cluster;
#   2. installs config/default exactly as docs/install.md says (kubectl apply -k config/default);
#   3. deploys a simulated vLLM fleet: vllm-sim from the same image, started with vLLM's own flags;
#   4. applies a LoRAAutoscaler for three adapters, waits (with deadlines) until every adapter is Loaded
#      and routable;
#   5. sends requests through the router: each adapter answers 200, an unknown model 404 at once;
#   6. deletes the cluster on exit (KEEP_CLUSTER=1 keeps it; diagnostics are printed on failure).
#
# The manifests below (fleet and autoscaler) are also applied by test/integration/test_manifests_kind_e2e.py
# against the local control plane, so they stay valid where this script cannot run.
#
# Environment: KIND_CLUSTER (default lora-autoscaler-e2e), KIND_NODE_IMAGE (kindest/node:v1.30 or newer),
# KEEP_CLUSTER=1, TIMEOUT (seconds per wait, default 180), LOCAL_PORT (port-forward, default 18000).
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER="${KIND_CLUSTER:-lora-autoscaler-e2e}"
IMAGE="ghcr.io/lora-autoscaler/lora-autoscaler:v0.1.0" # the image config/default installs (its images: entry)
NAMESPACE="default"                                    # the namespace config/default's router follows
TIMEOUT="${TIMEOUT:-180}"
LOCAL_PORT="${LOCAL_PORT:-18000}"
KEEP_CLUSTER="${KEEP_CLUSTER:-0}"
ADAPTERS=(lora-a lora-b lora-c)
CONTEXT="kind-${CLUSTER}"
created_cluster=0
port_forward_pid=""

log() { echo "[kind-e2e] $*" >&2; }
fail() {
  log "FAILED: $*"
  exit 1
}
need() { command -v "$1" >/dev/null 2>&1 || fail "$1 is not installed ($2)"; }
k() { kubectl --context "$CONTEXT" "$@"; }

# Wait until a command succeeds, at most $1 seconds; says what it waited for when it gives up.
wait_for() {
  local what="$1" seconds="$2"
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      log "gave up after ${seconds}s waiting for: ${what}"
      "$@" || true
      return 1
    fi
    sleep 2
  done
}

diagnostics() {
  log "--- diagnostics"
  k get pods -A -o wide || true
  k -n "$NAMESPACE" get loraautoscalers,loraplacements -o wide || true
  k -n "$NAMESPACE" describe loraautoscaler e2e || true
  k -n "$NAMESPACE" get endpointslices -l loraautoscaler.io/role -o wide || true
  for component in controller webhook router; do
    log "--- logs of the ${component}"
    k -n lora-system logs -l "app.kubernetes.io/component=${component}" --tail=60 --prefix || true
  done
}

cleanup() {
  local rc=$?
  trap - EXIT
  if [ -n "$port_forward_pid" ]; then kill "$port_forward_pid" 2>/dev/null || true; fi
  if [ "$rc" -ne 0 ] && [ "$created_cluster" -eq 1 ]; then diagnostics; fi
  if [ "$created_cluster" -eq 1 ]; then
    if [ "$KEEP_CLUSTER" = "1" ]; then
      log "keeping the cluster: kubectl --context ${CONTEXT} ...; delete it with: kind delete cluster --name ${CLUSTER}"
    else
      log "deleting the cluster ${CLUSTER}"
      kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || log "could not delete the cluster ${CLUSTER}"
    fi
  fi
  if [ "$rc" -eq 0 ]; then log "PASSED"; fi
  exit "$rc"
}
trap cleanup EXIT

need docker "https://docs.docker.com/get-docker/"
need kind "https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
need kubectl "https://kubernetes.io/docs/tasks/tools/"
need curl "any package manager"
docker info >/dev/null 2>&1 || fail "the Docker engine does not answer (docker info)"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  fail "a kind cluster named ${CLUSTER} exists already; delete it or set KIND_CLUSTER"
fi

log "creating the kind cluster ${CLUSTER}"
created_cluster=1
kind create cluster --name "$CLUSTER" ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"} --wait "${TIMEOUT}s"

log "building ${IMAGE} and loading it into the cluster"
docker build --tag "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"

log "installing config/default"
k apply -k config/default
k -n lora-system wait --for=condition=Available deployment --all --timeout="${TIMEOUT}s"

log "deploying the simulated vLLM fleet in ${NAMESPACE}"
k -n "$NAMESPACE" apply -f - <<'YAML'
# Two vLLM replicas of base model "base", simulated: vllm-sim takes vLLM's command line, serves vLLM's
# API (runtime LoRA loading, /v1/models, /metrics) and models the LoRA batch budget (--max-loras 2).
apiVersion: apps/v1
kind: Deployment
metadata:
  name: vllm-sim
  labels:
    app.kubernetes.io/name: vllm-sim
spec:
  replicas: 2
  selector:
    matchLabels:
      app.kubernetes.io/name: vllm-sim
  template:
    metadata:
      labels:
        app.kubernetes.io/name: vllm-sim
    spec:
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        seccompProfile:
          type: RuntimeDefault
      containers:
      - name: vllm
        image: ghcr.io/lora-autoscaler/lora-autoscaler:v0.1.0
        command: ["vllm-sim"]
        args: ["serve", "base", "--port", "8000", "--enable-lora", "--max-loras", "2", "--max-cpu-loras", "4"]
        env:
        - name: VLLM_ALLOW_RUNTIME_LORA_UPDATING
          value: "true"
        ports:
        - name: http
          containerPort: 8000
        readinessProbe:
          httpGet:
            path: /health
            port: http
          periodSeconds: 2
        resources:
          requests:
            cpu: 50m
            memory: 64Mi
          limits:
            memory: 256Mi
        securityContext:
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          capabilities:
            drop: ["ALL"]
YAML
k -n "$NAMESPACE" wait --for=condition=Available deployment/vllm-sim --timeout="${TIMEOUT}s"

log "applying the LoRAAutoscaler (retried until the webhook answers)"
apply_autoscaler() {
  k -n "$NAMESPACE" apply -f - <<'YAML'
# Three adapters on two replicas with two LoRA slots each: the even initial dispatch puts lora-a and lora-c
# on one pod and lora-b on the other. The sources are symbolic (the simulator accepts any s3:// path).
apiVersion: loraautoscaler.io/v1alpha1
kind: LoRAAutoscaler
metadata:
  name: e2e
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: vllm-sim
  vllm:
    port: 8000
    maxLorasPerReplica: 2
    maxCpuLorasPerReplica: 4
  adapters:
  - name: lora-a
    source: s3://e2e-adapters/lora-a
  - name: lora-b
    source: s3://e2e-adapters/lora-b
  - name: lora-c
    source: s3://e2e-adapters/lora-c
  scaling:
    metric:
      source: combined
      routerUrl: http://lora-router.lora-system:9090
YAML
}
wait_for "the webhook to admit the LoRAAutoscaler" "$TIMEOUT" apply_autoscaler

log "waiting until every adapter is Loaded and routable"
loaded_count() {
  k -n "$NAMESPACE" get loraplacements -l loraautoscaler.io/autoscaler=e2e \
    -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' | grep -c '^Loaded$'
}
all_loaded() { [ "$(loaded_count)" -ge "${#ADAPTERS[@]}" ]; }
wait_for "${#ADAPTERS[@]} Loaded placements" "$TIMEOUT" all_loaded
k -n "$NAMESPACE" wait --for=jsonpath='{.status.readyAdapters}'="${#ADAPTERS[@]}" loraautoscaler/e2e \
  --timeout="${TIMEOUT}s"
k -n "$NAMESPACE" get loraautoscaler e2e
k -n "$NAMESPACE" get loraplacements -o wide

log "sending requests through the router"
k -n lora-system port-forward service/lora-router "${LOCAL_PORT}:8000" >/dev/null 2>&1 &
port_forward_pid=$!
router="http://127.0.0.1:${LOCAL_PORT}"
wait_for "the port-forward to the router" 30 curl -fsS "${router}/v1/models"

completion() {
  curl -sS -o /dev/null -w '%{http_code}' --max-time 30 "${router}/v1/completions" \
    -H 'Content-Type: application/json' -d "{\"model\":\"$1\",\"prompt\":\"hello\",\"max_tokens\":4}"
}
answers_200() { [ "$(completion "$1")" = 200 ]; }
for adapter in "${ADAPTERS[@]}"; do
  # The router's table follows the route table's EndpointSlices; give it a moment to see the last one.
  wait_for "a 200 from ${adapter} through the router" 30 answers_200 "$adapter"
  log "${adapter}: 200"
done
code="$(completion no-such-adapter)"
[ "$code" = 404 ] || fail "an unknown model answered ${code}, not 404"
log "unknown model: 404"
