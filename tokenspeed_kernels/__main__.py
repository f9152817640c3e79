"""``python -m tokenspeed_kernels list``: what is registered and what this machine can run."""

from __future__ import annotations

import argparse
import sys

import torch

import tokenspeed_kernels
from tokenspeed_kernels import registry


def _dtypes(k: registry.Kernel) -> str:
    if k.dtypes is None:
        return "any"
    return ",".join(sorted(str(d).replace("torch.", "") for d in k.dtypes))


def _traits(k: registry.Kernel) -> str:
    return " ".join(f"{n}={registry._describe_values(v)}" for n, v in k.traits.items()) or "-"


def cmd_list() -> int:
    info = tokenspeed_kernels.build_info()
    here = registry.DeviceInfo.of(None)
    print(f"build: cuda={info['cuda']} archs={info['cuda_archs'] or '-'}  torch {torch.__version__}")
    print(f"this machine: {here.name or here.vendor} (capability {here.capability})")
    header = f"{'op':18} {'backend':12} {'priority':11} {'needs':18} {'dtypes':33} {'traits':28} here"
    print(header)
    print("-" * len(header))
    for k in registry.kernels():
        why = k.refuses(here, None, {})
        print(
            f"{k.op:18} {k.backend:12} {k.priority.name:11} {k.capability.describe():18} "
            f"{_dtypes(k):33} {_traits(k):28} {'yes' if why is None else 'no: ' + why}"
        )
    for err in registry.plugin_errors():
        print(f"plugin error: {err}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenspeed_kernels")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="registered kernels and whether this machine can run them")
    args = parser.parse_args(argv)
    if args.cmd == "list":
        return cmd_list()
    return 2


if __name__ == "__main__":
    sys.exit(main())
