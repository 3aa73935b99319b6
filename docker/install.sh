#!/bin/sh
# The one pip recipe every Cadence image uses (services/*/Dockerfile).
#   install.sh wheel                 build the cadence wheel from /src into /wheels
#   install.sh torch                 torch into the /opt/cadence venv: +cpu build (VARIANT=cpu) or PyPI's CUDA build
#   install.sh deps REQUIREMENTS     the extras' other requirements (docker/requirements.py wrote them)
#   install.sh cadence               the wheel from /wheels, without dependencies, then `pip check`
# Build arguments arrive as environment variables: PIP_INDEX (default PyPI), PIP_EXTRA_INDEX, TORCH_INDEX,
# TORCH_VERSION, VARIANT. A local wheel folder mounted at /wheelhouse (`--build-context wheelhouse=DIR`)
# is searched first; a CA bundle given as the build secret `pip_cert` is trusted (corporate mirrors).
set -eu
step=$1
shift

venv=/opt/cadence
set -- "$@" --no-cache-dir --disable-pip-version-check --index-url "${PIP_INDEX:-https://pypi.org/simple}"
if [ -n "${PIP_EXTRA_INDEX:-}" ]; then set -- "$@" --extra-index-url "$PIP_EXTRA_INDEX"; fi
if [ -n "$(ls -A /wheelhouse 2>/dev/null)" ]; then set -- "$@" --find-links /wheelhouse; fi
if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi

pip_in_venv() {
    # CADENCE_VENV_ARGS=--system-site-packages lets a base image's own torch/vLLM serve the venv.
    [ -x "$venv/bin/pip" ] || python3 -m venv ${CADENCE_VENV_ARGS:-} "$venv"
    "$venv/bin/pip" "$@"
}

case "$step" in
wheel)
    python3 -m venv /tmp/build-venv
    /tmp/build-venv/bin/pip wheel --no-deps --wheel-dir /wheels "$@" /src
    ;;
torch)
    case "${VARIANT:-cpu}" in
    # `+cpu` names the CPU build exactly, so no index can hand out the multi-GB CUDA one instead.
    cpu) pip_in_venv install "torch==${TORCH_VERSION}+cpu" "$@" --index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" ;;
    # PyPI's Linux torch is the CUDA build; a base image that already has this torch keeps its own.
    cuda) pip_in_venv install "torch==${TORCH_VERSION}" "$@" --index-url "${TORCH_INDEX:-${PIP_INDEX:-https://pypi.org/simple}}" ;;
    *) echo "VARIANT must be cpu or cuda, not '${VARIANT}'" >&2; exit 1 ;;
    esac
    ;;
deps)
    requirements=$1
    shift
    pip_in_venv install -r "$requirements" "$@"
    ;;
cadence)
    pip_in_venv install --no-deps /wheels/cadence-*.whl
    "$venv/bin/pip" check
    ;;
*)
    echo "unknown step '$step' (wheel | torch | deps | cadence)" >&2
    exit 1
    ;;
esac
