#!/usr/bin/env bash
# Narrow the device-only crash in c10::str(long) inside torch extensions.
cd /tmp
cat > p.cpp <<'C'
#include <torch/extension.h>
#include <sstream>
std::string s_only() { TORCH_CHECK(false, "strings only"); return ""; }
std::string to_str() { return std::to_string(42L); }
std::string oss() { std::ostringstream os; os << 42L; return os.str(); }
std::string c10str() { return c10::str("n=", 42L); }
C
for fn in to_str oss c10str s_only; do
python3 - <<PY 2>&1 | tail -1
import torch
from torch.utils.cpp_extension import load_inline
m = load_inline("p3", cpp_sources=[open("/tmp/p.cpp").read()], functions=["s_only","to_str","oss","c10str"], verbose=False)
try:
    print("$fn ->", m.$fn())
except RuntimeError as e:
    print("$fn raised OK:", str(e).splitlines()[0])
PY
echo "$fn rc ${PIPESTATUS[0]}"
done
SO=$(ls ~/.cache/torch_extensions/*/p3/p3*.so | head -1)
nm -DC $SO | grep -E "_M_insert<long>" ; readelf -d $SO | grep NEEDED
python3 -c "import torch; print(torch.compiled_with_cxx11_abi())"
ldconfig -p | grep libstdc++; strings /lib/x86_64-linux-gnu/libstdc++.so.6 | grep -E "^GLIBCXX_3.4.3[0-9]" | tail -2
