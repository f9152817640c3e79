#!/usr/bin/env bash
# Device-image crash: ostream<<long inside a torch extension segfaults, and the probe .so has
# no NEEDED libstdc++. Hypothesis: the link step does not pass libstdc++, so unversioned
# std:: references bind to the wrong symbol versions. Test: same probe linked with -lstdc++.
cd /tmp
python3 -c "import sysconfig,os; print('LDSHARED', sysconfig.get_config_var('LDSHARED')); print('CXX', sysconfig.get_config_var('CXX'), os.environ.get('CXX'))"
which g++ gcc c++; g++ --version | head -1; /opt/gcc/bin/g++ --version | head -1; /opt/gcc/bin/g++ -dumpspecs | grep -A1 -i "static-libstdc\|^\*link:" | head -6
for cxx in /opt/gcc/bin/g++ /usr/bin/g++; do export CXX=$cxx; echo "== CXX=$cxx"; rm -rf ~/.cache/torch_extensions/*/q_*
cat > q.cpp <<'C'
#include <torch/extension.h>
#include <sstream>
std::string oss() { std::ostringstream os; os << 42L << " " << 1.5; return os.str(); }
std::string c10str() { try { TORCH_CHECK(false, "n=", 42L); } catch (const c10::Error& e) { return e.what_without_backtrace(); } return ""; }
C
for flags in "" "-lstdc++"; do
python3 - <<PY 2>&1 | tail -2
import torch
from torch.utils.cpp_extension import load_inline
name = "q_" + ("l" if "$flags" else "n") + "$cxx".replace("/", "_")
m = load_inline(name, cpp_sources=[open("/tmp/q.cpp").read()], functions=["oss","c10str"], extra_ldflags=["$flags"] if "$flags" else None, verbose=False)
print("flags=[$flags]", repr(m.oss()), repr(m.c10str()[:40]))
PY
echo "flags=[$flags] rc ${PIPESTATUS[0]}"
done
done
for so in ~/.cache/torch_extensions/*/q_*/q_*.so /work/main/tokenspeed_kernels/_C*.so; do echo "$so"; readelf -d "$so" | grep -c 'libstdc++'; done
