#!/usr/bin/env bash
# Runs one igpt_jax command on a TPU slice of a GKE cluster, as a JobSet (one pod per TPU host).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/gke_tpu.sh --name NAME --tpu TYPE --topology TOPOLOGY --image IMAGE [options] -- COMMAND...

Renders a JobSet (jobset.x-k8s.io/v1alpha2) that starts COMMAND on every host of a TPU slice of
the GKE cluster kubectl points at, and applies it. One pod per TPU host, each asking for all of
its host's chips; JAX finds the other hosts itself (GKE's TPU webhook gives every pod the
worker hostnames and its index; IGPT_DISTRIBUTED_AUTO=1 makes igpt_jax call
jax.distributed.initialize), as with launch/tpu_pod.sh. IMAGE is a container image with this
checkout installed with its [tpu] extra (pip install -e ".[tpu]") in its working directory.

Options:
  --name NAME            JobSet name (or $IGPT_JOB_NAME); lower case, digits and '-'
  --tpu TYPE             v4, v5e, v5p or v6e (or $IGPT_TPU)
  --topology TOPOLOGY    the slice's chip topology, e.g. 16x16 (v5e-256) or 4x4x4 (v4-128)
                         (or $IGPT_TOPOLOGY); `python -m igpt_jax.plan --topology=TYPE:TOPOLOGY`
                         compiles the run for it first
  --image IMAGE          container image (or $IGPT_IMAGE)
  --namespace NS         Kubernetes namespace (default: default)
  --max-restarts N       restarts of the whole JobSet after a failure or a preemption; a run
                         resumes from its last checkpoint (default 10)
  --spot                 schedule on Spot TPU nodes (preempted runs exit 42 and restart)
  --env KEY=VALUE        an environment variable for COMMAND (repeatable)
  --dry-run              print the manifest instead of applying it
  -h, --help             this text

Example:
  launch/gke_tpu.sh --name igpt-l --tpu v5e --topology 16x16 --image us-docker.pkg.dev/P/R/igpt:1 -- \
      python -m igpt_jax.main --config=configs/l.py --workdir=gs://BUCKET/igpt_l \
      --config.mesh.fsdp=128 --config.mesh.tensor=2
USAGE
}

NAME="${IGPT_JOB_NAME:-}"; TPU="${IGPT_TPU:-}"; TOPOLOGY="${IGPT_TOPOLOGY:-}"
IMAGE="${IGPT_IMAGE:-}"; NAMESPACE="default"; MAX_RESTARTS=10; SPOT=0; DRY=0; ENVS=()
# The value of option $1, or one error line and exit 2 when it has none.
value() {
  if [[ -z "$2" || "$2" == --* ]]; then echo "error: $3 (see --help)" >&2; exit 2; fi
  printf '%s' "$2"
}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$(value "$1" "${2-}" "--name needs a value")"; shift 2 ;;
    --tpu) TPU="$(value "$1" "${2-}" "--tpu needs v4, v5e, v5p or v6e")"; shift 2 ;;
    --topology) TOPOLOGY="$(value "$1" "${2-}" "--topology needs a value, e.g. 16x16")"; shift 2 ;;
    --image) IMAGE="$(value "$1" "${2-}" "--image needs a value")"; shift 2 ;;
    --namespace) NAMESPACE="$(value "$1" "${2-}" "--namespace needs a value")"; shift 2 ;;
    --max-restarts) MAX_RESTARTS="$(value "$1" "${2-}" "--max-restarts needs a number")"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --env) ENVS+=("${2:?--env needs KEY=VALUE}"); shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n "$NAME" ]] || { echo "error: no job name: pass --name or set IGPT_JOB_NAME" >&2; exit 2; }
[[ "$NAME" =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]] || {
  echo "error: --name=$NAME: Kubernetes names are lower case letters, digits and '-'" >&2; exit 2; }
[[ -n "$IMAGE" ]] || { echo "error: no image: pass --image or set IGPT_IMAGE (a container with igpt_jax[tpu] installed)" >&2; exit 2; }
for arg in "$@"; do
  [[ "$arg" != --dry-run ]] || { echo "error: --dry-run comes after --, where it would be passed to COMMAND and the command really run; put the launcher's options before --" >&2; exit 2; }
done
[[ $# -gt 0 ]] || { echo "error: no command after -- (e.g. -- python -m igpt_jax.main --config=configs/l.py --workdir=gs://...)" >&2; exit 2; }
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || { echo "error: --max-restarts=$MAX_RESTARTS is not a count" >&2; exit 2; }

case "$TPU" in
  v4) ACCELERATOR=tpu-v4-podslice; DIMS=3 ;;
  v5e) ACCELERATOR=tpu-v5-lite-podslice; DIMS=2 ;;
  v5p) ACCELERATOR=tpu-v5p-slice; DIMS=3 ;;
  v6e) ACCELERATOR=tpu-v6e-slice; DIMS=2 ;;
  "") echo "error: no TPU type: pass --tpu (v4, v5e, v5p or v6e) or set IGPT_TPU" >&2; exit 2 ;;
  *) echo "error: --tpu=$TPU: use v4, v5e, v5p or v6e" >&2; exit 2 ;;
esac
[[ "$TOPOLOGY" =~ ^[0-9]+(x[0-9]+)+$ ]] && [[ $(tr -cd x <<<"$TOPOLOGY" | wc -c) -eq $((DIMS - 1)) ]] || {
  echo "error: --topology='$TOPOLOGY': a $TPU slice's topology has $DIMS dimensions, e.g." \
       "$([[ $DIMS -eq 2 ]] && echo 16x16 || echo 4x4x4)" >&2; exit 2; }
CHIPS=1; for d in ${TOPOLOGY//x/ }; do
  [[ $((10#$d)) -ge 1 ]] || { echo "error: --topology='$TOPOLOGY': every dimension must be at least 1" >&2; exit 2; }
  CHIPS=$((CHIPS * 10#$d)); done
# Chips per host: 4 on multi-host slices; v5e and v6e single-host slices have up to 8.
if [[ ( "$TPU" == v5e || "$TPU" == v6e ) && $CHIPS -le 8 ]]; then PER_HOST=$CHIPS
elif [[ $CHIPS -le 4 ]]; then PER_HOST=$CHIPS
else PER_HOST=4; fi
HOSTS=$((CHIPS / PER_HOST))
[[ $((HOSTS * PER_HOST)) -eq $CHIPS ]] || {
  echo "error: --topology='$TOPOLOGY' has $CHIPS chips, not a whole number of $PER_HOST-chip $TPU hosts; use a slice shape GKE offers (e.g. $([[ $DIMS -eq 2 ]] && echo 4x4 || echo 2x2x4))" >&2; exit 2; }
[[ "$IMAGE" =~ ^[A-Za-z0-9][A-Za-z0-9._/:@-]*$ ]] || {
  echo "error: --image='$IMAGE' is not a container image reference (registry/path/name:tag or @sha256:digest, without spaces)" >&2; exit 2; }

COMMAND="$(printf '%q ' "$@")"
yaml_quote() { local s=${1//\\/\\\\}; s=${s//\"/\\\"}; printf '"%s"' "$s"; }

render() {
  cat <<YAML
# igpt_jax on a ${TPU} ${TOPOLOGY} slice (${CHIPS} chips, ${HOSTS} host(s) x ${PER_HOST}), rendered by launch/gke_tpu.sh
apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata:
  name: ${NAME}
  namespace: ${NAMESPACE}
  annotations:
    alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool
spec:
  network:
    enableDNSHostnames: true  # workers reach worker 0 (the coordinator) by name
  failurePolicy:
    maxRestarts: ${MAX_RESTARTS}
  replicatedJobs:
  - name: workers
    replicas: 1
    template:
      spec:
        parallelism: ${HOSTS}
        completions: ${HOSTS}
        completionMode: Indexed
        backoffLimit: 0
        template:
          spec:
            restartPolicy: Never
            terminationGracePeriodSeconds: 120
            nodeSelector:
              cloud.google.com/gke-tpu-accelerator: ${ACCELERATOR}
              cloud.google.com/gke-tpu-topology: ${TOPOLOGY}
YAML
  if [[ $SPOT -eq 1 ]]; then
    echo "              cloud.google.com/gke-spot: \"true\""
  fi
  cat <<YAML
            containers:
            - name: igpt-jax
              image: ${IMAGE}
              command: ["bash", "-c"]
              args:
              - $(yaml_quote "IGPT_DISTRIBUTED_AUTO=1 exec ${COMMAND}")
              env:
              - name: IGPT_DISTRIBUTED_AUTO
                value: "1"
YAML
  local kv
  for kv in "${ENVS[@]+"${ENVS[@]}"}"; do
    [[ "$kv" == *=* ]] || { echo "error: --env $kv: expected KEY=VALUE" >&2; exit 2; }
    echo "              - name: ${kv%%=*}"
    echo "                value: $(yaml_quote "${kv#*=}")"
  done
  cat <<YAML
              ports:
              - containerPort: 8471  # TPU runtime
              - containerPort: 8476  # jax.distributed coordinator (worker 0)
              securityContext:
                privileged: true
              resources:
                requests:
                  google.com/tpu: ${PER_HOST}
                limits:
                  google.com/tpu: ${PER_HOST}
YAML
}

MANIFEST="$(render)"
if [[ $DRY -eq 1 ]]; then
  printf '%s\n' "$MANIFEST"
else
  printf '%s\n' "$MANIFEST" | kubectl apply -f -
  echo "Applied JobSet $NAME: kubectl get jobset $NAME -n $NAMESPACE; logs: kubectl logs -n $NAMESPACE -l jobset.sigs.k8s.io/jobset-name=$NAME --prefix -f"
fi
