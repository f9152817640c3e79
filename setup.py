"""Build of TokenSpeed's compiled parts.

- tokenspeed_kernels._C: op schemas + CPU references always; CUDA kernels when the
  installed torch has CUDA and nvcc is found (TOKENSPEED_CUDA_ARCHS, default 90a).
- tokenspeed_engine._scheduler: the C++20 control plane (pybind11, no CUDA).

Variables: see tokenspeed_kernels/env.py.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_env():
    spec = importlib.util.spec_from_file_location("_ts_env", os.path.join(ROOT, "tokenspeed_kernels", "env.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


env = _load_env()


def _find_cuda_home() -> str | None:
    """The toolkit root whose lib64 holds libcudart (a wrapper nvcc on PATH can mislead torch)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        # A shell-script wrapper (exec /usr/local/cuda-X/bin/nvcc): read its target.
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096).decode("utf-8", "ignore")
            for tok in head.split():
                if tok.endswith("/bin/nvcc") and os.path.isfile(tok):
                    candidates.append(os.path.dirname(os.path.dirname(tok)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "bin", "nvcc")) and glob.glob(os.path.join(c, "lib*", "libcudart.so*")):
            return c
    return None


CUDA_HOME = _find_cuda_home()
if CUDA_HOME and "CUDA_HOME" not in os.environ:
    os.environ["CUDA_HOME"] = CUDA_HOME  # must be set before torch.utils.cpp_extension is imported

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ARCHS = env.cuda_archs()
WITH_CUDA = bool(ARCHS) and torch.version.cuda is not None and CUDA_HOME is not None
os.environ.setdefault(env.MAX_JOBS, str(os.cpu_count() or 2))

if shutil.which("ccache") and env.get(env.CCACHE, "1") != "0":
    os.environ.setdefault("CXX", "ccache c++")
    if CUDA_HOME:
        os.environ.setdefault("PYTORCH_NVCC", f"ccache {os.path.join(CUDA_HOME, 'bin', 'nvcc')}")


def _cutlass_includes() -> list[str]:
    home = env.get(env.CUTLASS_HOME)
    if home:
        return [os.path.join(home, "include"), os.path.join(home, "tools", "util", "include")]
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return []
    base = os.path.join(list(spec.submodule_search_locations)[0], "source")
    return [os.path.join(base, "include"), os.path.join(base, "tools", "util", "include")]


def _kernel_extension():
    csrc = os.path.join(ROOT, "csrc")
    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)  # noqa: E731
    families = [os.path.join(csrc, d) for d in ("common", "mla", "moe")]
    sources = ["csrc/torch_library.cpp"] + rel(p for d in families for p in glob.glob(os.path.join(d, "*_cpu.cpp")))
    cxx = ["-O3", "-std=c++20", "-DNDEBUG"]
    include_dirs = [csrc]
    if not WITH_CUDA:
        print(f"tokenspeed: building without CUDA (archs={ARCHS}, torch cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
        return CppExtension("tokenspeed_kernels._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx})

    sources += rel(p for d in families for p in glob.glob(os.path.join(d, "*_cuda.cpp")))
    sources += rel(p for d in families for p in glob.glob(os.path.join(d, "**", "*.cu"), recursive=True))
    arch_tag = "_".join(ARCHS)
    cxx += ["-DTOKENSPEED_WITH_CUDA", f"-DTOKENSPEED_CUDA_ARCHS_STR_RAW={arch_tag}"]
    nvcc = ["-O3", "-std=c++20", "-DNDEBUG", "-lineinfo", "--expt-relaxed-constexpr", "-DTOKENSPEED_WITH_CUDA"]
    for a in ARCHS:
        nvcc.append(f"-gencode=arch=compute_{a},code=sm_{a}")
    if env.flag(env.PTXAS_VERBOSE):
        nvcc += ["-Xptxas", "-v"]
    if env.flag(env.MLA_TRACE):  # timeline printf in the sm90 MLA decode (scripts/dev/mla_trace.py)
        nvcc += ["-DTS_MLA_TRACE"]
    site = sysconfig.get_paths()["purelib"]
    extra = [os.path.join(site, "nvidia", "cu13", "include"), os.path.join(CUDA_HOME, "include", "cccl")]
    include_dirs += [d for d in extra + _cutlass_includes() if os.path.isdir(d)]
    print(f"tokenspeed: building CUDA sources for {ARCHS} with {CUDA_HOME}")
    return CUDAExtension(
        "tokenspeed_kernels._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx, "nvcc": nvcc}
    )


def _scheduler_extension():
    """The control plane needs no torch: a plain pybind11 module, so it imports without libtorch."""
    bind = os.path.join(ROOT, "csrc", "scheduler", "python", "bind.cpp")
    if not os.path.isfile(bind):
        return None
    import pybind11
    from setuptools import Extension

    sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "scheduler", "*.cpp")))
    sources.append(os.path.relpath(bind, ROOT))
    return Extension(
        "tokenspeed_engine._scheduler",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc", "scheduler"), pybind11.get_include()],
        extra_compile_args={"cxx": ["-O3", "-std=c++20", "-DNDEBUG", "-fvisibility=hidden"]},
        language="c++",
    )


if env.flag(env.SKIP_EXTENSIONS):
    ext_modules = []  # `make` installs the metadata once and compiles in place, incrementally
else:
    ext_modules = [e for e in (_kernel_extension(), _scheduler_extension()) if e is not None]

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
