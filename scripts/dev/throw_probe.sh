#!/usr/bin/env bash
# Which C++ throws survive on this machine? (diagnosing extension segfaults on throw)
cd /tmp
cat > t.cpp <<'C'
#include <stdexcept>
#include <cstdio>
extern "C" int run() { try { throw std::runtime_error("x"); } catch (const std::exception& e) { return 7; } return 0; }
int main() { std::printf("exe throw -> %d\n", run()); }
C
g++ -O1 t.cpp -o t && ./t; echo "exe rc $?"
g++ -O1 -fcf-protection=none t.cpp -o t2 && ./t2; echo "exe nocf rc $?"
g++ -O1 -shared -fPIC t.cpp -o libt.so && python3 -c "import ctypes; print('ctypes so ->', ctypes.CDLL('/tmp/libt.so').run())"; echo "ctypes rc $?"
python3 -c "import torch, ctypes; print('ctypes so after torch ->', ctypes.CDLL('/tmp/libt.so').run())"; echo "ctypes+torch rc $?"
g++ -O1 -shared -fPIC -fcf-protection=none t.cpp -o libt2.so && python3 -c "import torch, ctypes; print('nocf so after torch ->', ctypes.CDLL('/tmp/libt2.so').run())"; echo "rc $?"
grep -o -m1 'user_shstk\|shstk' /proc/cpuinfo; ldd --version | head -1; uname -r
GLIBC_TUNABLES=glibc.cpu.x86_shstk=off python3 -c "import torch, ctypes; print('shstk off ->', ctypes.CDLL('/tmp/libt.so').run())"; echo "rc $?"
cd - >/dev/null
python3 scripts/dev/abi_probe.py c++17 -fcf-protection=none 2>&1 | tail -1
