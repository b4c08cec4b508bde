#!/usr/bin/env bash
# The prepared device check (issue 13): everything portopt must show on a lent GPU, in one run.
#
#     bash bench/device_check.sh                  # on the GPU machine (device tool: run), writes under $OUT
#     DEVICE=cpu PYTHON=/path/to/python bash bench/device_check.sh
#                                                 # the dry run here: the same steps on the CPU, smaller,
#                                                 # with an interpreter that has torch (and the test deps)
#
# The GPU machine has torch 2.11 + CUDA 13 + Triton and the test dependencies preinstalled (pytest,
# hypothesis, rich, matplotlib, numpy, onnx, onnxruntime) and no registry: portopt is installed from this
# checkout into a folder of its own, with nothing fetched. Every step has its own time
# limit (the whole run stays under 8 minutes on an H100/H200), writes its log, and a failing step does not
# stop the others. What comes back (at most 8 files from $OUT, refreshed after every step): summary.md,
# env.json, the device's conformance JSON, the step-time JSON/Markdown, the model-steps JSON and
# device_check.tar.gz holding every log and report.
#
# Results to commit afterwards (bench/README.md, "Device check"): bench/results/conformance_<device>_<gpu>.json,
# bench/results/step_time_<device>_<gpu>.{json,md}.
set -uo pipefail
cd "$(dirname "$0")/.."
device=${DEVICE:-cuda}
out=${OUT:-bench/results/device_check_$device}
work=$(mktemp -d)
mkdir -p "$out"
started=$SECONDS
summary="$work/summary.md"
echo "# portopt device check ($device), $(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$summary"

step() { # step NAME LIMIT_S COMMAND...: run with a time limit, log to $work/NAME.log, record the outcome
    local name="$1" limit="$2" t0=$SECONDS rc=0
    shift 2
    echo "::: $name (limit ${limit} s)"
    timeout --signal=TERM --kill-after=20 "$limit" "$@" >"$work/$name.log" 2>&1 || rc=$?
    tail -n 5 "$work/$name.log"
    echo "- $name: exit $rc, $((SECONDS - t0)) s" | tee -a "$summary"
    collect
}

collect() { # refresh what comes back after every step: a run killed at its limit returns what it did
    cp -f bench/results/step_time_"${device}"_check.{json,md} bench/results/model_steps_"${device}"_check.json \
        "$work/" 2>/dev/null
    cp -f "$summary" "$out/"
    [[ -f $work/env.json ]] && cp -f "$work/env.json" "$out/"
    [[ -f $work/conformance/conformance.json ]] && cp -f "$work/conformance/conformance.json" "$out/conformance_$device.json"
    cp -f "$work"/step_time_"${device}"_check.{json,md} "$work/model_steps_${device}_check.json" "$out/" 2>/dev/null
    tar czf "$out/device_check.tar.gz" -C "$work" .
}

# Install portopt from this checkout into a folder of its own (no index, no build isolation: setuptools
# and wheel are there). Not a venv: the GPU machine's python3 is itself a venv (/opt/torch/.venv), and a
# venv made from it with --system-site-packages would not see its torch. PYTHONSAFEPATH keeps the
# checkout's own portopt/ (which lacks portopt.backends until installed) off sys.path; bench/ is reached
# through PYTHONPATH after the installed package.
py=${PYTHON:-python3}
site=/tmp/portopt-device-site
"$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$site" . \
    >"$work/install.log" 2>&1 || { cat "$work/install.log"; echo "- install: FAILED" | tee -a "$summary"; }
export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 TORCHINDUCTOR_CACHE_DIR=/tmp/portopt-inductor
export PYTHONPATH="$site"
bench_path="$site:$PWD"

if [[ $device == cpu ]]; then
    quick=(--quick --algorithm adamw --algorithm lion --algorithm adafactor)
    bench=(--quick --algorithms adamw lion --rounds 3)
    models=(--sets 20x1M --workloads adamw lion --rounds 2)
    tests=(-m "cuda and not slow")  # here every one skips, each with the reason naming what is missing
else
    quick=(--quick)
    bench=(--sizes 20e6 --rounds 10)
    models=(--sets 20x1M gpt2_small --workloads adamw adamw_bf16 lion radam nadam adabelief lamb --rounds 10)
    tests=(-m "cuda and not slow" -n 8)  # pytest-xdist is on the GPU machine (16 cores)
fi

# Most important first: a step cut off by its limit leaves the ones before it complete. The caps sum to
# 570 s (plus the install): the device tool's 600 s call limit holds even if every step runs to its cap.
step env 30 env PYTHONPATH="$bench_path" "$py" -m bench.device_env --device "$device" --out "$work/env.json"
# The quick set on the device: every algorithm x every backend usable there x fp32, bf16, fp16+master.
# --time-limit: a run that would overrun stops itself with a partial report (the step's cap is the backstop).
step conformance 170 "$py" -m portopt conformance --device "$device" "${quick[@]}" --time-limit 155 \
    --report-dir "$work/conformance"
# Step time and bandwidth against torch.optim (fused, foreach, for-loop) and third-party packages present.
step step_time 100 env PYTHONPATH="$bench_path" "$py" -m bench.step_time --device "$device" "${bench[@]}" \
    --no-compile-cache --output "step_time_${device}_check"
# The issue's shape sets (20 x 1M, GPT-2 small's 148 tensors) as a user gets each optimizer, vs AdamW(fused).
step model_steps 80 env PYTHONPATH="$bench_path" "$py" -m bench.model_steps --device "$device" "${models[@]}" \
    --output "model_steps_${device}_check"
# The CUDA tests: the `cuda` marker (device-parametrized tests carry it on their cuda parameter); the
# slow torch.optim grid on CUDA (640 cases) is left to `-m cuda` by hand.
step cuda_tests 80 "$py" -m pytest -p no:cacheprovider -q -rs "${tests[@]}" --junitxml="$work/cuda_tests.xml" tests
# A golden file recorded on the CPU (the float64 reference), checked on the device.
step golden_record 25 "$py" -m portopt conformance record --quick --algorithm adamw --algorithm sgd \
    --out "$work/golden_cpu.npz"
step golden_check 40 "$py" -m portopt conformance check --golden "$work/golden_cpu.npz" --device "$device" \
    --backend torch --backend torch_fused --precision fp32 --report-dir "$work/golden"
# torch.optim itself on the device, in fp32 (the suite's own check: torch's implementations pass it).
step conformance_torch 45 "$py" -m portopt conformance --device "$device" "${quick[@]}" --impl torch.optim \
    --impl torch.optim:fused=True --precision fp32 --time-limit 35 --report-dir "$work/conformance_torch"

echo "- total: $((SECONDS - started)) s" >>"$summary"
collect
cat "$summary"
