# Set up this checkout's Python environment; meant to be sourced by the other .ci scripts:
#
#     source .ci/setup.sh [EXTRA]     # EXTRA: "test" (default; what the tests need) or "dev" (+ ruff, mypy)
#
# Afterwards the venv is active and $PORTOPT_VENV names it. Needs only python3 (>= 3.10) and pip.
#
# torch: a torch >= 2.11 that the base python3 already imports is reused, not reinstalled (the lent
# GPU machines have a CUDA torch preinstalled and no network). Otherwise torch==2.13.0 is installed
# FIRST and pinned: an unpinned torch, asked for directly or through our dependencies, pulls the
# newest multi-GB CUDA build.
#
# Environment: PORTOPT_PYTHON (default python3), PORTOPT_VENV (default <checkout>/.venv).
# Re-running is cheap: a stamp in the venv records what was installed for which pyproject.toml.

PORTOPT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORTOPT_TORCH_PIN="torch==2.13.0"
PORTOPT_MIN_TORCH="2.11"

_portopt_setup() {
    local extra="${1:-test}"
    case "$extra" in
        test | dev) ;;
        *) echo "setup.sh: unknown extra '$extra' (accepted: test, dev)" >&2; return 2 ;;
    esac
    local base="${PORTOPT_PYTHON:-python3}"
    PORTOPT_VENV="${PORTOPT_VENV:-$PORTOPT_ROOT/.venv}"
    export PORTOPT_VENV

    if ! "$base" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        echo "setup.sh: $base is missing or older than Python 3.10 (set PORTOPT_PYTHON)" >&2
        return 1
    fi

    # Does `python` import a torch >= PORTOPT_MIN_TORCH? Prints its version if so.
    _portopt_torch_ok() {
        "$1" - "$PORTOPT_MIN_TORCH" 2>/dev/null <<'PY'
import sys
try:
    import torch
except Exception:
    sys.exit(1)
version = torch.__version__.split("+")[0]
have = tuple(int(x) for x in version.split(".")[:2])
need = tuple(int(x) for x in sys.argv[1].split("."))
print(torch.__version__)
sys.exit(have < need)
PY
    }

    local reuse=0 base_torch
    if base_torch="$(_portopt_torch_ok "$base")"; then
        reuse=1
    fi

    if [[ ! -x "$PORTOPT_VENV/bin/python" ]]; then
        echo "setup.sh: creating $PORTOPT_VENV"
        if ((reuse)); then
            # Like --system-site-packages, but also right when the base python3 is itself a venv
            # (then --system-site-packages would expose the interpreter's site, not the venv's torch).
            # The base's site folders come after the venv's own, so what the venv installs wins. No pip
            # of its own: an old bundled pip/setuptools would shadow the base's (pip comes from the base).
            "$base" -m venv --without-pip "$PORTOPT_VENV" || return 1
            "$base" - "$PORTOPT_VENV" <<'PY' || return 1
import site, subprocess, sys
dirs = [d for d in site.getsitepackages() + [site.getusersitepackages()] if d]
purelib = subprocess.check_output(
    [sys.argv[1] + "/bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
).strip()
with open(purelib + "/_portopt_base_site.pth", "w") as f:
    f.write("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs) + "\n")
PY
            echo "setup.sh: reusing the base python's packages (torch $base_torch)"
            "$PORTOPT_VENV/bin/python" -m pip --version >/dev/null 2>&1 || "$PORTOPT_VENV/bin/python" -m ensurepip -q
        else
            "$base" -m venv "$PORTOPT_VENV" || return 1
        fi
    fi

    # shellcheck disable=SC1091
    source "$PORTOPT_VENV/bin/activate" || return 1
    local py="$PORTOPT_VENV/bin/python"
    "$py" -m pip --version >/dev/null || { echo "setup.sh: no pip in $PORTOPT_VENV or its base" >&2; return 1; }

    local stamp="$PORTOPT_VENV/.portopt-installed" want
    want="$(cd "$PORTOPT_ROOT" && "$py" -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())') $PORTOPT_ROOT"
    if [[ -f "$stamp" ]] && grep -qxF "$want $extra" "$stamp" 2>/dev/null; then
        return 0
    fi
    if [[ "$extra" == test ]] && [[ -f "$stamp" ]] && grep -qxF "$want dev" "$stamp"; then
        return 0 # dev includes test
    fi

    local torch_version
    if torch_version="$(_portopt_torch_ok "$py")"; then
        echo "setup.sh: using torch $torch_version"
    else
        echo "setup.sh: pip install $PORTOPT_TORCH_PIN"
        "$py" -m pip install -q "$PORTOPT_TORCH_PIN" || return 1
    fi

    echo "setup.sh: pip install -e .[$extra]"
    if ((reuse)); then
        # Offline first: everything may already be there (the lent GPU machines have no network).
        (cd "$PORTOPT_ROOT" && "$py" -m pip install -q --no-index --no-build-isolation -e ".[$extra]" 2>/dev/null) ||
            (cd "$PORTOPT_ROOT" && "$py" -m pip install -q -e ".[$extra]") || return 1
    else
        (cd "$PORTOPT_ROOT" && "$py" -m pip install -q -e ".[$extra]") || return 1
    fi
    # The ONNX runtime the onnx tests and backend need: required where a registry is reachable (CI); on an
    # offline machine that lacks it (a lent GPU machine) the onnx tests skip, saying onnxruntime is missing.
    echo "setup.sh: pip install -e .[onnx]"
    if ((reuse)); then
        (cd "$PORTOPT_ROOT" && "$py" -m pip install -q --no-index --no-build-isolation -e ".[onnx]" 2>/dev/null) ||
            (cd "$PORTOPT_ROOT" && "$py" -m pip install -q -e ".[onnx]" 2>/dev/null) ||
            echo "setup.sh: onnx/onnxruntime not installable here (offline?): the onnx backend and its tests are skipped" >&2
    else
        (cd "$PORTOPT_ROOT" && "$py" -m pip install -q -e ".[onnx]") || return 1
    fi
    # The reference implementations of CAME and SophiaG (tests only): like onnx, optional offline.
    echo "setup.sh: pip install -e .[references]"
    if ((reuse)); then
        (cd "$PORTOPT_ROOT" && "$py" -m pip install -q --no-index --no-build-isolation -e ".[references]" 2>/dev/null) ||
            (cd "$PORTOPT_ROOT" && "$py" -m pip install -q -e ".[references]" 2>/dev/null) ||
            echo "setup.sh: came-pytorch/sophia-opt not installable here (offline?): their comparison tests are skipped" >&2
    else
        (cd "$PORTOPT_ROOT" && "$py" -m pip install -q -e ".[references]") || return 1
    fi
    echo "$want $extra" >>"$stamp"
}

_portopt_setup "$@" || { echo "setup.sh: FAILED" >&2; return 1 2>/dev/null || exit 1; }
