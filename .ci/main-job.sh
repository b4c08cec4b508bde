#!/usr/bin/env bash
# The main job (README: "Main job"): set up this checkout's venv, then check this machine's
# devices against the float64 reference and write the report under reports/.
#
#     bash .ci/main-job.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/setup.sh test
report_dir=reports
mkdir -p "$report_dir"

python - <<'PY'
import platform, torch
cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"portopt main job: python {platform.python_version()}, torch {torch.__version__}, CUDA device: {cuda}")
PY
portopt show adamw

# Compiled kernels are cached with the checkout: a second run loads them instead of compiling.
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/torchinductor}"

# The parity run: every algorithm on every backend usable on this machine's devices, in every
# precision, against the float64 reference, in one worker process per core. Progress goes to the
# log; the reports in $report_dir (JSON, JUnit XML, HTML, Markdown) are kept up to date as it runs
# and say "partial" until it ends, so a run cut short (SIGTERM, a CI time limit) leaves a report.
# Extra arguments are passed on (e.g. --quick, --algorithm adamw, --device cuda, --workers 1).
devices=(--device cpu)
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    devices+=(--device cuda)
fi
# An Ascend NPU (torch_npu and CANN installed: `pip install 'portopt[npu]'`), looked for without breaking the job.
if python -c "import sys; from portopt.backends import device_unavailable_reason as r; sys.exit(r('npu') is not None)" 2>/dev/null; then
    devices+=(--device npu)
fi
# Backends: every one usable here but two duplicates, unless the arguments choose (--backend, --impl):
# `reference` computes the float64 values of the chain it is compared with (the same primitive rules;
# tests/test_reference_vs_torch.py checks it against torch.optim), and `npu-contract` emulates a device
# this machine does not have and, for the algorithms without an Ascend kernel (all but Adam, AdamW and
# SGD with momentum), runs the torch backend's generic lowering on CPU, checked already as `torch`.
# `--backend reference` or `--backend npu-contract` runs them (README, "Main job").
backends=()
if ! printf '%s\n' "$@" | grep -qE '^--(backend|impl)(=|$)'; then
    for name in $(python -c "from portopt.backends import available
print(' '.join(r.name for r in available() if r.usable and r.name not in ('reference', 'npu-contract')))"); do
        backends+=(--backend "$name")
    done
fi
# In the background so that a SIGTERM or SIGINT sent to this script alone (not to its process
# group, as `timeout` and CI runners do) still reaches the run, which then writes its partial report.
portopt conformance "${devices[@]}" "${backends[@]}" --report-dir "$report_dir" "$@" &
run=$!
trap 'kill -TERM "$run" 2>/dev/null || true' TERM INT HUP
status=0
while :; do
    wait "$run" && status=0 || status=$?
    kill -0 "$run" 2>/dev/null || break # still running: the wait was cut short by a signal
done
trap - TERM INT HUP

echo "main job: report in $report_dir/ (conformance.html; conformance.md for a pull request)"
exit "$status"
