"""Triton kernels under the CPU interpreter, one subprocess per test module.

TRITON_INTERPRET must be set before triton is imported, so a test module that checks its
Triton kernels on the CPU runs itself once in a child process with the variable set: the
child runs every case (``interpret_main``), prints one JSON line of per-case results, and
the parent's module-scoped fixture (``run_in_interpreter``) hands them to the parametrized
tests, which assert each case's ``ok`` and show its ``report``. A fresh random seed per run
keeps the inputs fresh; it is in every report so a failure can be replayed.

Test module::

    @pytest.fixture(scope="module")
    def interpreter_results():
        return run_in_interpreter(__file__)

    if __name__ == "__main__" and sys.argv[1:2] == ["--interpret"]:
        interpret_main({cid: partial(run_case, case) for cid, case in CPU_CASES.items()}, int(sys.argv[2]))
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_in_interpreter(test_file: str, timeout: float = 600) -> dict[str, dict[str, Any]]:
    """Run ``test_file --interpret SEED`` with TRITON_INTERPRET=1; its per-case results."""
    import pytest

    pytest.importorskip("triton")
    seed = random.randrange(2**31)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, os.path.abspath(test_file), "--interpret", str(seed)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, f"interpreter subprocess failed (seed {seed}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1])


def interpret_main(jobs: Mapping[str, Callable[[int], dict[str, Any]]], seed: int) -> None:
    """The child's side: run every job with seed + its index, print the results as one JSON line.

    A job returns ``{"ok": bool, "report": str}``; an exception fails that job alone."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    results: dict[str, dict[str, Any]] = {}
    for i, (case_id, job) in enumerate(jobs.items()):
        try:
            results[case_id] = job(seed + i)
        except Exception as exc:  # report per case; the parent test names it
            results[case_id] = {"ok": False, "report": f"seed={seed + i}: {type(exc).__name__}: {exc}"}
    print(json.dumps(results))
