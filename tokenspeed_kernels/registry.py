"""Kernel registry: which implementation of an op runs, and why.

A kernel is registered with the op it implements, its backend name, the hardware it
needs (vendor, compute-capability range), the dtypes and shape traits it supports,
and a priority band. ``select(op, device=..., dtype=..., **traits)`` returns the
highest-priority kernel that accepts the request; ``explain`` says why each
candidate was taken or refused. ``TOKENSPEED_KERNEL_BACKEND`` and the
``use_backend`` context manager force a backend. Out-of-tree packages register
through the entry-point group ``tokenspeed_kernels.plugins`` (each entry point is a
callable taking this module). Implementations load lazily; a failed import is
raised with its original error attached, never swallowed.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
import traceback
import warnings
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import torch

from tokenspeed_kernels import env

PLUGIN_GROUP = "tokenspeed_kernels.plugins"


class Priority(IntEnum):
    """Bands, lowest first: a higher band wins whenever it accepts the request."""

    REFERENCE = 0  # torch reference: always correct, slow
    UNVERIFIED = 5  # written and compile-checked, not yet verified on hardware: wins only over the reference
    PORTABLE = 10  # runs on a wide range of hardware (Triton, native CPU)
    PERFORMANT = 20  # tuned for a hardware family
    SPECIALISED = 30  # tuned for one arch and shape set (e.g. sm_90a, DeepSeek dims)
    PLUGIN = 40  # out-of-tree kernels registered through entry points


@dataclass(frozen=True)
class DeviceInfo:
    """What a kernel's capability is checked against; build one by hand to ask about other GPUs."""

    vendor: str  # "cpu", "nvidia", "amd"
    capability: tuple[int, int] | None = None  # compute capability (NVIDIA) or None
    name: str = ""

    @staticmethod
    def of(device: torch.device | str | DeviceInfo | None) -> DeviceInfo:
        """DeviceInfo of a torch device ("cpu", "cuda:0"); None means the current CUDA device or CPU."""
        if isinstance(device, DeviceInfo):
            return device
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cpu":
            return DeviceInfo("cpu", None, "cpu")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"registry: device {device} requested but torch sees no CUDA device")
            props = torch.cuda.get_device_properties(device)
            vendor = "amd" if getattr(torch.version, "hip", None) else "nvidia"
            return DeviceInfo(vendor, (props.major, props.minor), props.name)
        return DeviceInfo(device.type, None, str(device))


# Fake devices for tests and for asking "what would run on ...?".
H100 = DeviceInfo("nvidia", (9, 0), "NVIDIA H100 (fake)")
B200 = DeviceInfo("nvidia", (10, 0), "NVIDIA B200 (fake)")
A100 = DeviceInfo("nvidia", (8, 0), "NVIDIA A100 (fake)")
CPU = DeviceInfo("cpu", None, "cpu")


@dataclass(frozen=True)
class Capability:
    """Hardware a kernel needs. Compute-capability bounds are inclusive."""

    vendors: frozenset[str]
    min_cc: tuple[int, int] | None = None
    max_cc: tuple[int, int] | None = None

    def refuses(self, dev: DeviceInfo) -> str | None:
        if dev.vendor not in self.vendors:
            return f"needs vendor {sorted(self.vendors)}, device is {dev.vendor}"
        if self.min_cc is not None or self.max_cc is not None:
            if dev.capability is None:
                return "needs a compute capability, device has none"
            if self.min_cc is not None and dev.capability < self.min_cc:
                return f"needs compute capability >= {self.min_cc}, device is {dev.capability}"
            if self.max_cc is not None and dev.capability > self.max_cc:
                return f"needs compute capability <= {self.max_cc}, device is {dev.capability}"
        return None

    def describe(self) -> str:
        s = "/".join(sorted(self.vendors))
        if self.min_cc or self.max_cc:
            lo = ".".join(map(str, self.min_cc)) if self.min_cc else ""
            hi = ".".join(map(str, self.max_cc)) if self.max_cc else ""
            s += f" sm[{lo}..{hi}]"
        return s


ANY_DEVICE = Capability(frozenset({"cpu", "nvidia", "amd"}))
CPU_ONLY = Capability(frozenset({"cpu"}))


@dataclass
class Kernel:
    """One registered implementation of an op.

    ``impl`` is either the callable or a ``"module:attribute"`` string imported on first
    use. ``traits`` maps a trait name to the collection of values supported (e.g.
    ``{"page_size": {64}, "q_len": range(1, 9)}``); a request that does not state a
    trait is not refused for it.
    """

    op: str
    backend: str
    impl: Callable[..., Any] | str
    capability: Capability = ANY_DEVICE
    dtypes: frozenset[torch.dtype] | None = None  # None: any
    traits: dict[str, Collection[Any]] = field(default_factory=dict)
    priority: Priority = Priority.REFERENCE
    description: str = ""
    unavailable: str | None = None  # why this build cannot run it at all (e.g. "built without CUDA")
    _loaded: Callable[..., Any] | None = field(default=None, repr=False)

    def refuses(self, dev: DeviceInfo, dtype: torch.dtype | None, traits: dict[str, Any]) -> str | None:
        """Why this kernel cannot serve the request, or None if it can."""
        if self.unavailable:
            return self.unavailable
        why = self.capability.refuses(dev)
        if why:
            return why
        if dtype is not None and self.dtypes is not None and dtype not in self.dtypes:
            return f"dtype {dtype} not in {sorted(str(d) for d in self.dtypes)}"
        for name, value in traits.items():
            if value is None or name not in self.traits:
                continue
            if value not in self.traits[name]:
                return f"{name}={value} not supported (supports {_describe_values(self.traits[name])})"
        return None

    def load(self) -> Callable[..., Any]:
        """The callable; imports it on first use and re-raises import errors with context."""
        if self._loaded is None:
            if callable(self.impl):
                self._loaded = self.impl
            else:
                module, _, attr = self.impl.partition(":")
                try:
                    self._loaded = getattr(importlib.import_module(module), attr)
                except Exception as exc:  # report, with the original error chained
                    raise BackendImportError(
                        f"backend {self.backend!r} of op {self.op!r} failed to load {self.impl!r}: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
        return self._loaded

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.load()(*args, **kwargs)


class BackendImportError(ImportError):
    """A backend's implementation failed to import; ``__cause__`` is the original error."""


class NoKernelError(RuntimeError):
    """No registered kernel accepts the request; the message holds ``explain``'s table."""


def _describe_values(values: Collection[Any]) -> str:
    if isinstance(values, range):
        return f"{values.start}..{values.stop - 1}" + (f" step {values.step}" if values.step != 1 else "")
    return "{" + ", ".join(str(v) for v in sorted(values, key=str)) + "}"


_lock = threading.RLock()
_kernels: dict[str, list[Kernel]] = {}
_override = threading.local()
_plugin_errors: list[str] = []
_plugins_loaded = False
# select() results, keyed by everything that decides them; any (un)registration empties it.
# Engines call select() per layer call, so an unchanged question must cost a dict lookup.
_select_cache: dict[tuple[Any, ...], Kernel] = {}
_SELECT_CACHE_MAX = 4096


def register(
    op: str,
    backend: str,
    impl: Callable[..., Any] | str,
    *,
    capability: Capability = ANY_DEVICE,
    dtypes: Collection[torch.dtype] | None = None,
    traits: dict[str, Collection[Any]] | None = None,
    priority: Priority = Priority.REFERENCE,
    description: str = "",
    unavailable: str | None = None,
) -> Kernel:
    """Register an implementation; re-registering (op, backend) replaces the earlier one."""
    kernel = Kernel(
        op=op,
        backend=backend,
        impl=impl,
        capability=capability,
        dtypes=frozenset(dtypes) if dtypes is not None else None,
        traits=dict(traits or {}),
        priority=priority,
        description=description,
        unavailable=unavailable,
    )
    with _lock:
        entries = [k for k in _kernels.get(op, []) if k.backend != backend]
        entries.append(kernel)
        _kernels[op] = entries
        _select_cache.clear()
    return kernel


def unregister(op: str, backend: str) -> None:
    """Remove one registration (no error if absent)."""
    with _lock:
        _kernels[op] = [k for k in _kernels.get(op, []) if k.backend != backend]
        _select_cache.clear()


def ops() -> list[str]:
    """Names of every op with at least one registered kernel."""
    _ensure_plugins()
    return sorted(op for op, ks in _kernels.items() if ks)


def kernels(op: str | None = None) -> list[Kernel]:
    """Registered kernels of one op (or all), highest priority first."""
    _ensure_plugins()
    with _lock:
        pool = _kernels.get(op, []) if op is not None else [k for ks in _kernels.values() for k in ks]
        return sorted(pool, key=lambda k: (k.op, -k.priority, k.backend))


def _forced_backend(op: str) -> str | None:
    stack = getattr(_override, "stack", [])
    for forced_op, backend in reversed(stack):
        if forced_op in (op, "*"):
            return backend
    env_map = env.backend_overrides()
    return env_map.get(op, env_map.get("*"))


@contextlib.contextmanager
def use_backend(backend: str, op: str = "*") -> Iterator[None]:
    """Force ``backend`` for ``op`` (or every op) inside the block; wins over the env variable."""
    stack = getattr(_override, "stack", None)
    if stack is None:
        stack = _override.stack = []
    stack.append((op, backend))
    try:
        yield
    finally:
        stack.pop()


UNVERIFIED_REASON = (
    "not yet verified on hardware (priority UNVERIFIED): force it with TOKENSPEED_KERNEL_BACKEND "
    "or registry.use_backend"
)


def explain(
    op: str,
    device: torch.device | str | DeviceInfo | None = None,
    dtype: torch.dtype | None = None,
    *,
    verified_only: bool = False,
    **traits: Any,
) -> list[tuple[Kernel, str | None]]:
    """Every kernel of ``op`` with the reason it is refused (None = acceptable), best first.

    ``verified_only``: refuse kernels of priority UNVERIFIED unless forced (what an engine
    asks: code that has not run on the hardware yet must not serve requests)."""
    dev = DeviceInfo.of(device)
    forced = _forced_backend(op)
    rows = []
    for k in kernels(op):
        why = k.refuses(dev, dtype, traits)
        if why is None and forced is not None and k.backend != forced:
            why = f"overridden: backend {forced!r} forced"
        if why is None and verified_only and k.priority == Priority.UNVERIFIED and k.backend != forced:
            why = UNVERIFIED_REASON
        rows.append((k, why))
    return rows


def format_explain(op: str, rows: list[tuple[Kernel, str | None]]) -> str:
    """Render explain()'s rows as text, marking the one select() would take."""
    lines = [f"candidates for {op}:"]
    taken = False
    for k, why in rows:
        mark = "refused" if why else ("TAKEN" if not taken else "ok")
        taken = taken or why is None
        lines.append(f"  [{mark:7}] {k.backend:12} {k.priority.name:11} {why or k.description}")
    return "\n".join(lines)


def select(
    op: str,
    device: torch.device | str | DeviceInfo | None = None,
    dtype: torch.dtype | None = None,
    *,
    verified_only: bool = False,
    **traits: Any,
) -> Kernel:
    """The best kernel for ``op`` on ``device`` with ``dtype`` and shape ``traits``
    (``verified_only``: see ``explain``).

    Raises NoKernelError (with the full explanation) if none accepts, including when a
    forced backend cannot serve the request: an override never falls back silently.
    Answers are cached per (op, device, dtype, traits, override, verified_only) until the
    next (un)registration.
    """
    _ensure_plugins()
    dev = DeviceInfo.of(device)
    forced = _forced_backend(op)
    try:
        key: tuple[Any, ...] | None = (op, dev, dtype, frozenset(traits.items()), forced, verified_only)
        hit = _select_cache.get(key)
    except TypeError:  # an unhashable trait value: answer without the cache
        key, hit = None, None
    if hit is not None:
        return hit
    rows = explain(op, dev, dtype, verified_only=verified_only, **traits)
    if not rows:
        raise NoKernelError(f"no kernel is registered for op {op!r}; registered ops: {ops()}")
    if forced is not None and not any(k.backend == forced for k, _ in rows):
        raise NoKernelError(
            f"backend {forced!r} is forced for {op!r} but not registered; backends: {[k.backend for k, _ in rows]}"
        )
    for k, why in rows:
        if why is None:
            if key is not None:
                with _lock:
                    if len(_select_cache) >= _SELECT_CACHE_MAX:
                        _select_cache.clear()
                    _select_cache[key] = k
            return k
    request = f"device={dev}, dtype={dtype}, traits={traits}"
    raise NoKernelError(f"no kernel of {op!r} accepts {request}\n{format_explain(op, rows)}")


def plugin_errors() -> list[str]:
    """Tracebacks of plugins that failed to load (also issued as warnings)."""
    _ensure_plugins()
    return list(_plugin_errors)


def load_plugins(force: bool = False) -> None:
    """Load entry points of group ``tokenspeed_kernels.plugins`` (once unless ``force``)."""
    global _plugins_loaded
    with _lock:
        if _plugins_loaded and not force:
            return
        _plugins_loaded = True
    if env.flag(env.DISABLE_PLUGINS):
        return
    from importlib.metadata import entry_points

    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            hook = ep.load()
            hook(__import__(__name__, fromlist=["register"]))
        except Exception as exc:
            msg = f"plugin {ep.name!r} ({ep.value}) failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            _plugin_errors.append(msg)
            warnings.warn(f"tokenspeed_kernels: {msg}", RuntimeWarning, stacklevel=2)


def _ensure_plugins() -> None:
    if not _plugins_loaded:
        load_plugins()
