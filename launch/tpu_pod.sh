#!/usr/bin/env bash
# Runs one igpt_jax command on every worker of a Cloud TPU VM slice (v4-256, v5e-256, ...).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/tpu_pod.sh --name NAME --zone ZONE [options] -- COMMAND...

Copies this checkout to every worker of the TPU VM slice NAME, installs it (with jax[tpu]) in a
virtual environment there, and starts COMMAND on all workers at once (--worker=all). JAX finds
the other workers itself (IGPT_DISTRIBUTED_AUTO=1 makes igpt_jax call jax.distributed.initialize).

Options:
  --name NAME            TPU VM name (or $TPU_NAME)
  --zone ZONE            GCP zone (or $TPU_ZONE)
  --project PROJECT      GCP project (default: gcloud's)
  --create TYPE          create the slice first with this accelerator type, e.g. v4-256
  --version VERSION      TPU VM software version for --create (default tpu-ubuntu2204-base)
  --spot                 create a Spot (preemptible) slice; preempted runs exit 42 and resume
  --skip-install         do not copy and install the checkout (it is already there)
  --dry-run              print the gcloud commands instead of running them
  -h, --help             this text

Example:
  launch/tpu_pod.sh --name igpt-l --zone us-central2-b --create v4-256 -- \
      python -m igpt_jax.main --config=configs/l.py --workdir=gs://BUCKET/igpt_l
USAGE
}

NAME="${TPU_NAME:-}"; ZONE="${TPU_ZONE:-}"; PROJECT=""; CREATE=""; VERSION="tpu-ubuntu2204-base"
SPOT=0; INSTALL=1; DRY=0
# The value of option $1, or one error line and exit 2 when it has none.
value() {
  if [[ -z "$2" || "$2" == --* ]]; then echo "error: $3 (see --help)" >&2; exit 2; fi
  printf '%s' "$2"
}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$(value "$1" "${2-}" "--name needs a value")"; shift 2 ;;
    --zone) ZONE="$(value "$1" "${2-}" "--zone needs a value")"; shift 2 ;;
    --project) PROJECT="$(value "$1" "${2-}" "--project needs a value")"; shift 2 ;;
    --create) CREATE="$(value "$1" "${2-}" "--create needs an accelerator type, e.g. v4-256")"; shift 2 ;;
    --version) VERSION="$(value "$1" "${2-}" "--version needs a value")"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --skip-install) INSTALL=0; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n "$NAME" ]] || { echo "error: no TPU name: pass --name or set TPU_NAME" >&2; exit 2; }
[[ -n "$ZONE" ]] || { echo "error: no zone: pass --zone or set TPU_ZONE" >&2; exit 2; }
for arg in "$@"; do
  [[ "$arg" != --dry-run ]] || { echo "error: --dry-run comes after --, where it would be passed to COMMAND and the command really run; put the launcher's options before --" >&2; exit 2; }
done
[[ $# -gt 0 ]] || { echo "error: no command after -- (e.g. -- python -m igpt_jax.main --config=configs/l.py --workdir=gs://...)" >&2; exit 2; }

REPO="$(cd "$(dirname "$0")/.." && pwd)"
GCLOUD=(gcloud compute tpus tpu-vm)
SCOPE=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && SCOPE+=(--project "$PROJECT")
COMMAND="$(printf '%q ' "$@")"

run() {
  if [[ $DRY -eq 1 ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}

if [[ -n "$CREATE" ]]; then
  EXTRA=(); [[ $SPOT -eq 1 ]] && EXTRA+=(--spot)
  if [[ $DRY -eq 1 ]] || ! "${GCLOUD[@]}" describe "$NAME" "${SCOPE[@]}" >/dev/null 2>&1; then
    run "${GCLOUD[@]}" create "$NAME" "${SCOPE[@]}" --accelerator-type "$CREATE" \
        --version "$VERSION" "${EXTRA[@]}"
  fi
fi
if [[ $INSTALL -eq 1 ]]; then
  TARBALL="/tmp/igpt_jax_$$.tar.gz"
  run tar -czf "$TARBALL" -C "$REPO" --exclude=.venv --exclude=.git .
  run "${GCLOUD[@]}" scp "$TARBALL" "$NAME:igpt_jax.tar.gz" --worker=all "${SCOPE[@]}"
  run "${GCLOUD[@]}" ssh "$NAME" --worker=all "${SCOPE[@]}" --command \
      "mkdir -p igpt_jax && tar -xzf igpt_jax.tar.gz -C igpt_jax && cd igpt_jax && python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip && pip install -q -e . 'jax[tpu]'"
fi
run "${GCLOUD[@]}" ssh "$NAME" --worker=all "${SCOPE[@]}" --command \
    "cd igpt_jax && . .venv/bin/activate && IGPT_DISTRIBUTED_AUTO=1 $COMMAND"
