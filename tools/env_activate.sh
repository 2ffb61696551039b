#!/usr/bin/env bash
# Runtime settings for benchmarking. Source it: `source tools/env_activate.sh`.
# Sets OpenMP threads to the physical cores (unless already set), Intel OpenMP's knobs, and
# preloads a faster allocator and Intel OpenMP when they are installed. Prints what it set.

_llmbench_set() { export "$1=$2"; echo "env_activate: $1=$2"; }

if [ -z "${OMP_NUM_THREADS:-}" ]; then
  _cores=$(python3 -c 'import psutil; print(psutil.cpu_count(logical=False) or psutil.cpu_count())' 2>/dev/null || nproc)
  _llmbench_set OMP_NUM_THREADS "$_cores"
else
  echo "env_activate: OMP_NUM_THREADS=$OMP_NUM_THREADS (kept)"
fi
# Only Intel OpenMP reads these; harmless otherwise.
_llmbench_set KMP_BLOCKTIME 1
_llmbench_set KMP_TPAUSE 0
_llmbench_set KMP_AFFINITY "granularity=fine,compact,1,0"

_llmbench_prefix=$(python3 -c 'import sys; print(sys.prefix)' 2>/dev/null || echo /usr)
_llmbench_find() {  # first existing file among the arguments
  for f in "$@"; do [ -f "$f" ] && { echo "$f"; return 0; }; done; return 1
}
_preload=""
if _lib=$(_llmbench_find "$_llmbench_prefix/lib/libjemalloc.so" /usr/lib/*-linux-gnu/libjemalloc.so.2 /usr/lib64/libjemalloc.so.2); then
  _preload="$_lib"
  _llmbench_set MALLOC_CONF "oversize_threshold:1,background_thread:true,metadata_thp:auto,dirty_decay_ms:9000000000,muzzy_decay_ms:9000000000"
elif _lib=$(_llmbench_find "$_llmbench_prefix/lib/libtcmalloc.so" /usr/lib/*-linux-gnu/libtcmalloc.so.4 /usr/lib64/libtcmalloc.so.4); then
  _preload="$_lib"
else
  echo "env_activate: no jemalloc/tcmalloc found (apt-get install libjemalloc2 for a faster allocator)"
fi
if _lib=$(_llmbench_find "$_llmbench_prefix/lib/libiomp5.so"); then
  _preload="${_preload:+$_preload:}$_lib"
else
  echo "env_activate: Intel OpenMP (libiomp5) not installed; torch's own OpenMP is used"
fi
if [ -n "$_preload" ]; then
  _llmbench_set LD_PRELOAD "${_preload}${LD_PRELOAD:+:$LD_PRELOAD}"
fi
unset _cores _lib _preload _llmbench_prefix
unset -f _llmbench_set _llmbench_find
