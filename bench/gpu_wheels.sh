#!/usr/bin/env bash
# Wheels for a GPU machine without network access: downloads, on a machine with one, every package of
# requirements.txt (torch excepted, see below) and their dependencies for Linux x86-64 and one Python
# version into DIR, plus torchrl and tensordict (bench/bench_hrl.py's column (d)); writes
# DIR/requirements.txt and prints the install commands to run on the GPU machine.
#
#   bench/gpu_wheels.sh DIR [PYTHON_VERSION [NAME ...]]  # PYTHON_VERSION: 3.11 (default), 3.12, ...
#   GPU_WHEELS_TORCH=1 bench/gpu_wheels.sh DIR           # also torch itself (PyPI's CUDA build: several GB)
#
# NAMEs (packages of requirements.txt) fetch only those, with their pins and dependencies, for a
# machine that has the rest: e.g. `bench/gpu_wheels.sh wheels 3.12 mujoco mujoco-warp warp-lang tyro`.
#
# torch is left out by default: a GPU machine usually has a CUDA build of torch already, and the
# CUDA wheel with its NVIDIA libraries is several GB. torchrl and tensordict are fetched without their
# dependencies (they name torch) and installed with --no-deps.
set -eu

if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: $0 DIR [PYTHON_VERSION [NAME ...]]   (PYTHON_VERSION like 3.11; GPU_WHEELS_TORCH=1 to include torch)" >&2
    exit 2
fi
mkdir -p "$1"
DIR=$(cd "$1" && pwd)
REQUIREMENTS="$(cd "$(dirname "$0")/.." && pwd)/requirements.txt"
PYTHON_VERSION=${2:-3.11}
case "$PYTHON_VERSION" in
    3.[0-9] | 3.[0-9][0-9]) ;;
    *) echo "PYTHON_VERSION must look like 3.11, got '$PYTHON_VERSION'" >&2; exit 2 ;;
esac
TORCHRL_NO_DEPS="torchrl==0.14.1 tensordict==0.14.3 hoptorch==0.1.4"  # each names torch among its dependencies
TORCHRL_DEPS="cloudpickle importlib_metadata orjson packaging pyvers"  # their other dependencies
PIP=${PIP:-python3 -m pip}

# requirements.txt without comments, without torch unless asked for, plus torchrl's other dependencies
if [ "${GPU_WHEELS_TORCH:-0}" = "1" ]; then
    sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$REQUIREMENTS" >"$DIR/requirements.txt"
else
    sed -e 's/#.*//' -e '/^[[:space:]]*$/d' -e '/^torch[=<>~ ]/d' "$REQUIREMENTS" >"$DIR/requirements.txt"
fi
echo "$TORCHRL_DEPS" | tr ' ' '\n' >>"$DIR/requirements.txt"
if [ $# -gt 2 ]; then  # only the named packages
    shift 2
    ALL=$(cat "$DIR/requirements.txt")
    : >"$DIR/requirements.txt"
    for name in "$@"; do
        line=$(echo "$ALL" | grep -i -E "^${name}([=<>~ ]|$)" || true)
        if [ -z "$line" ]; then
            echo "$name is not a package of $REQUIREMENTS (or torchrl's dependencies); expected one of:" \
                "$(echo "$ALL" | sed 's/[=<>~ ].*//' | tr '\n' ' ')" >&2
            exit 2
        fi
        echo "$line" >>"$DIR/requirements.txt"
    done
fi

TARGET=(--only-binary=:all: --implementation cp --python-version "$PYTHON_VERSION"
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64 -d "$DIR")
$PIP download "${TARGET[@]}" -r "$DIR/requirements.txt"
# shellcheck disable=SC2086
$PIP download "${TARGET[@]}" --no-deps $TORCHRL_NO_DEPS

echo
echo "$(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1), in $DIR for CPython $PYTHON_VERSION on Linux x86-64."
echo "On the GPU machine, from the repository root, with $DIR copied beside it:"
echo "  python3 -m pip install --no-index --find-links $DIR -r $DIR/requirements.txt"
echo "  python3 -m pip install --no-index --find-links $DIR --no-deps $TORCHRL_NO_DEPS"
echo "  bench/gpu_check.sh gpu_check_out"
