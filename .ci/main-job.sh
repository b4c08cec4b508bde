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

# The parity run. The conformance CLI replaces this one line:
#   portopt conformance --report-dir "$report_dir"
PYTHONSAFEPATH=1 python -m pytest tests/test_reference_vs_torch.py -q -p no:cacheprovider --junitxml "$report_dir/reference-vs-torch.xml"

echo "main job: report in $report_dir/"
