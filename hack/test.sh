#!/usr/bin/env bash
# The whole test suite: setup, control-plane binaries, lint, types, import contracts, Dockerfile lint,
# then pytest (unit, conformance, integration against a real kube-apiserver and etcd).
# Every check runs even when an earlier one fails, so one run shows everything that is wrong; a summary of
# each step, its time and pytest's counts ends the output, and the exit code is non-zero if any step failed.
# Extra arguments go to pytest (e.g. hack/test.sh -k webhook).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
hack/setup.sh

echo "=== control-plane binaries (built once per version, cached outside the clone)" >&2
LORA_AUTOSCALER_KUBE_BIN="$(hack/build-control-plane.sh | tail -n 1)"
export LORA_AUTOSCALER_KUBE_BIN

summary=()
failed=0
# run NAME COMMAND...: runs one check, records whether it passed and how long it took.
run() {
  local name=$1 t0=$SECONDS rc=0
  shift
  echo >&2
  echo "=== $name" >&2
  "$@" || rc=$?
  if [ "$rc" -eq 0 ]; then
    summary+=("$(printf '  %-8s %-22s %5ss' ok "$name" $((SECONDS - t0)))")
  else
    summary+=("$(printf '  %-8s %-22s %5ss  (exit %s)' FAILED "$name" $((SECONDS - t0)) "$rc")")
    failed=1
  fi
  return 0
}

run ruff .venv/bin/ruff check .
run mypy .venv/bin/mypy .
run lint-imports .venv/bin/lint-imports
run hadolint .venv/bin/hadolint Dockerfile

log="$(mktemp -t lora-autoscaler-pytest.XXXXXX)"
trap 'rm -f "$log"' EXIT
# pytest exits 5 when it collected no tests: a selection that matches nothing is a failure, not a pass.
pytest_step() {
  local rc=0 color=()
  if [ -t 1 ]; then color=(--color=yes); fi  # output goes through tee, which pytest would take for a file
  .venv/bin/python -m pytest "${color[@]}" --durations=20 "$@" 2>&1 | tee "$log" || rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 5 ]; then echo "pytest collected no tests" >&2; return 1; fi
  return "$rc"
}
run pytest pytest_step "$@"

total=$((SECONDS - started))
verdict=PASSED
if [ "$failed" -ne 0 ]; then verdict=FAILED; fi
echo >&2
echo "=== summary: $verdict ($((total / 60))m $((total % 60))s in all)" >&2
printf '%s\n' "${summary[@]}" >&2
# pytest's own closing line (its counts of passed, failed, skipped and errors, and its time) comes last.
counts="$(sed -E 's/\x1b\[[0-9;]*m//g' "$log" | grep -E '^(=+ )?([0-9]+ [a-z]+|no tests ran).* in [0-9.]+s( \([0-9:]+\))?( =+)?$' \
  | tail -n 1 | sed -E 's/^=+ //; s/ =+$//' || true)"
echo "pytest: ${counts:-no closing line (see above)}" >&2
[ "$failed" -eq 0 ]
