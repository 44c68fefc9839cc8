#!/bin/sh
# Starts AUTOMATIC1111 (API only) with the flags in webui-flags.txt next to this script.
#
#   start-webui.sh            run it; the gpu image's SIDECAR_A1111_COMMAND, supervised by the sidecar
#   start-webui.sh --prepare  image build only: install A1111's Python packages and helper repositories,
#                             then exit (launch.py --exit), without needing a GPU
#
# Extra arguments are passed on to launch.py. When SIDECAR_A1111_API_AUTH (user:password) is set, A1111
# gets it as --api-auth, so that its API answers only callers that hold it (the sidecar sends it). A1111_DIR and A1111_PYTHON point at the checkout and at
# the Python of its virtual environment (set in the Dockerfile).
set -eu
set -f  # the flags are split on whitespace below; never glob them

here=$(cd "$(dirname "$0")" && pwd)
flags=$(sed -e 's/#.*//' "$here/webui-flags.txt" | tr '\n' ' ')
cd "${A1111_DIR:?A1111_DIR is not set}"

if [ "${1:-}" = "--prepare" ]; then
    shift
    # shellcheck disable=SC2086  # word splitting of $flags is intended
    exec "${A1111_PYTHON:?}" launch.py $flags --skip-torch-cuda-test --exit "$@"
fi
if [ -n "${SIDECAR_A1111_API_AUTH:-}" ]; then
    set -- --api-auth "$SIDECAR_A1111_API_AUTH" "$@"
fi
# At run time everything is installed already: skip pip, git and the CUDA self-test.
# shellcheck disable=SC2086
exec "${A1111_PYTHON:?}" launch.py $flags --skip-prepare-environment "$@"
