#!/usr/bin/env bash
# Native backtrace of the extension-throw segfault, plus flag/env variants.
python3 scripts/dev/abi_probe.py c++17 -g0 2>&1 | tail -1
TORCH_DISABLE_ADDR2LINE=1 python3 scripts/dev/abi_probe.py c++17 2>&1 | tail -1
TORCH_SHOW_CPP_STACKTRACES=1 python3 scripts/dev/abi_probe.py c++17 2>&1 | tail -1
ls ~/.cache/torch_extensions/*/ 2>/dev/null | head
SO=$(ls -d ~/.cache/torch_extensions/*/probe_cpp17*/ | head -1)
cat > /tmp/crash.py <<PY
import sys, torch
sys.path.insert(0, "$SO")
import importlib; mod = importlib.import_module("$(basename $SO)")
mod.boom(torch.zeros(2))
PY
cuda-gdb -q -batch -ex run -ex bt -ex "info sharedlibrary" --args python3 /tmp/crash.py 2>&1 | grep -v "^\[New Thread\|^\[Thread" | head -60
