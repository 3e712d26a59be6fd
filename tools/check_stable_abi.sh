#!/usr/bin/env bash
# The stable-ABI check of built libraries (Note [Stable ABI], csrc/common/stable.h): each
# library's undefined dynamic symbols, demangled, must name no libtorch C++ API (at::, c10::,
# torch::); libtorch is reached only through its stable C shim (aoti_torch_*, torch_*).
#
#   bash tools/check_stable_abi.sh fisheradaptune/_C*.so
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: $0 LIBRARY..." >&2; exit 2; }
fail=0
for lib in "$@"; do
  bad=$(nm -D --undefined-only "$lib" | c++filt | grep -E 'at::|c10::|torch::' || true)
  shim=$(nm -D --undefined-only "$lib" | grep -cE ' U (aoti_torch_|torch_)' || true)
  if [ -n "$bad" ]; then
    echo "check_stable_abi: $lib calls $(wc -l <<<"$bad") libtorch C++ symbols:"
    echo "$bad" | sed 's/^/    /'
    fail=1
  else
    echo "check_stable_abi: $(basename "$lib"): 0 libtorch C++ symbols; $shim stable C shim symbols"
  fi
done
exit "$fail"
