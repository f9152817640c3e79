"""Probe: does a TORCH_CHECK thrown from an extension survive under -std=c++17 / c++20?"""

import subprocess
import sys

src = r"""
#include <torch/extension.h>
at::Tensor boom(const at::Tensor& x) { TORCH_CHECK(x.dim() == 99, "probe: rank must be 99, got ", x.dim()); return x; }
TORCH_LIBRARY(probe_NAME, m) { m.def("boom(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(probe_NAME, CPU, m) { m.impl("boom", &boom); }
"""
std = sys.argv[1]
ldflags = sys.argv[2:]
tag = std.replace("+", "p") + str(abs(hash(tuple(ldflags))) % 1000)
code = f'''
import torch
from torch.utils.cpp_extension import load_inline
mod = load_inline(
    "probe_{tag}",
    cpp_sources=[{src.replace("NAME", tag)!r}],
    functions=["boom"],
    extra_cflags=["-std={std}", "-O1"] + [f for f in {ldflags!r} if f.startswith("-f")],
    extra_ldflags={ldflags!r},
    verbose=False,
)
for name, fn in (("direct", mod.boom), ("dispatcher", torch.ops.probe_{tag}.boom)):
    try:
        fn(torch.zeros(2))
    except RuntimeError as e:
        print("{std}", name, "OK:", str(e).splitlines()[0])
'''
r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
print(std, "rc", r.returncode, r.stdout.strip(), r.stderr.strip()[-300:])
