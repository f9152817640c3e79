"""Kernel registry: selection by capability/dtype/traits, explain, overrides, plugins."""

from __future__ import annotations

import sys
import types
from importlib.metadata import EntryPoint

import pytest
import torch

from tokenspeed_kernels import env, registry
from tokenspeed_kernels.registry import A100, B200, CPU, H100, Capability, DeviceInfo, Priority

SM90 = Capability(frozenset({"nvidia"}), min_cc=(9, 0), max_cc=(9, 0))
SM100 = Capability(frozenset({"nvidia"}), min_cc=(10, 0))
NV = Capability(frozenset({"nvidia"}), min_cc=(8, 0))


@pytest.fixture
def toy_op():
    """A throwaway op with a reference, a portable Triton-like and two arch-specific kernels."""
    op = "toy_decode"
    registry.register(op, "reference", lambda: "reference")
    registry.register(op, "triton", lambda: "triton", capability=NV, priority=Priority.PORTABLE)
    registry.register(
        op,
        "cuda_sm90",
        lambda: "sm90",
        capability=SM90,
        dtypes=[torch.bfloat16],
        traits={"page_size": {64}, "heads": {16, 32, 64, 128}, "q_len": range(1, 9)},
        priority=Priority.SPECIALISED,
    )
    registry.register(op, "cuda_sm100", lambda: "sm100", capability=SM100, priority=Priority.SPECIALISED)
    yield op
    for b in ("reference", "triton", "cuda_sm90", "cuda_sm100", "broken"):
        registry.unregister(op, b)


def test_select_by_capability(toy_op) -> None:
    assert registry.select(toy_op, H100, torch.bfloat16, page_size=64, heads=16, q_len=1)() == "sm90"
    assert registry.select(toy_op, B200, torch.bfloat16)() == "sm100"
    assert registry.select(toy_op, A100, torch.bfloat16)() == "triton"
    assert registry.select(toy_op, CPU, torch.bfloat16)() == "reference"


def test_select_by_dtype_and_traits(toy_op) -> None:
    assert registry.select(toy_op, H100, torch.float16, page_size=64)() == "triton"
    assert registry.select(toy_op, H100, torch.bfloat16, page_size=16)() == "triton"
    assert registry.select(toy_op, H100, torch.bfloat16, heads=8)() == "triton"
    assert registry.select(toy_op, H100, torch.bfloat16, q_len=9)() == "triton"
    assert registry.select(toy_op, H100, torch.bfloat16, q_len=8)() == "sm90"


def test_explain_gives_a_reason_per_candidate(toy_op) -> None:
    rows = registry.explain(toy_op, H100, torch.bfloat16, page_size=32)
    reasons = {k.backend: why for k, why in rows}
    assert reasons["cuda_sm90"] == "page_size=32 not supported (supports {64})"
    assert "compute capability >= (10, 0)" in reasons["cuda_sm100"]
    assert reasons["triton"] is None and reasons["reference"] is None
    text = registry.format_explain(toy_op, rows)
    assert "TAKEN" in text and text.index("triton") < text.index("TAKEN") + 40


def test_context_manager_override(toy_op) -> None:
    with registry.use_backend("reference", op=toy_op):
        assert registry.select(toy_op, H100, torch.bfloat16)() == "reference"
        with registry.use_backend("triton"):
            assert registry.select(toy_op, H100, torch.bfloat16)() == "triton"
    assert registry.select(toy_op, H100, torch.bfloat16, page_size=64)() == "sm90"


def test_env_override(toy_op, monkeypatch) -> None:
    monkeypatch.setenv(env.KERNEL_BACKEND, f"other_op=cuda_sm90,{toy_op}=triton")
    assert registry.select(toy_op, H100, torch.bfloat16)() == "triton"
    monkeypatch.setenv(env.KERNEL_BACKEND, "reference")
    assert registry.select(toy_op, H100, torch.bfloat16)() == "reference"


def test_forced_backend_that_cannot_run_is_an_error(toy_op, monkeypatch) -> None:
    with registry.use_backend("cuda_sm90", op=toy_op):
        with pytest.raises(registry.NoKernelError, match=r"cuda_sm90 .*needs vendor"):
            registry.select(toy_op, CPU)
    with registry.use_backend("nonexistent", op=toy_op):
        with pytest.raises(registry.NoKernelError, match=r"'nonexistent' is forced .* not registered"):
            registry.select(toy_op, H100)


def test_no_kernel_message_lists_candidates(toy_op) -> None:
    registry.unregister(toy_op, "reference")
    with pytest.raises(registry.NoKernelError, match=r"candidates for toy_decode"):
        registry.select(toy_op, CPU)
    with pytest.raises(registry.NoKernelError, match=r"no kernel is registered for op 'unknown_op'"):
        registry.select("unknown_op", CPU)


def test_lazy_import_failure_keeps_original_error(toy_op) -> None:
    registry.register(toy_op, "broken", "tokenspeed_no_such_module.kernels:run", priority=Priority.PLUGIN)
    kernel = registry.select(toy_op, CPU)
    assert kernel.backend == "broken"
    with pytest.raises(registry.BackendImportError, match=r"tokenspeed_no_such_module") as info:
        kernel()
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_unavailable_kernel_is_refused_with_reason(toy_op) -> None:
    registry.register(toy_op, "cuda_sm100", lambda: "x", capability=SM100, unavailable="built without CUDA")
    reasons = {k.backend: why for k, why in registry.explain(toy_op, B200)}
    assert reasons["cuda_sm100"] == "built without CUDA"


def test_plugins_register_and_failures_are_reported(toy_op, monkeypatch) -> None:
    good = types.ModuleType("ts_fake_plugin")

    def hook(reg):
        reg.register(toy_op, "plugin_x", lambda: "plugin", priority=Priority.PLUGIN)

    good.hook = hook
    monkeypatch.setitem(sys.modules, "ts_fake_plugin", good)
    eps = [
        EntryPoint("good", "ts_fake_plugin:hook", registry.PLUGIN_GROUP),
        EntryPoint("bad", "ts_missing_plugin_module:hook", registry.PLUGIN_GROUP),
    ]
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [e for e in eps if e.group == group])
    monkeypatch.setattr(registry, "_plugin_errors", [])
    with pytest.warns(RuntimeWarning, match=r"plugin 'bad' .*ModuleNotFoundError"):
        registry.load_plugins(force=True)
    try:
        assert registry.select(toy_op, CPU)() == "plugin"
        assert any("ts_missing_plugin_module" in e for e in registry.plugin_errors())
    finally:
        registry.unregister(toy_op, "plugin_x")


def test_builtin_ops_on_fake_devices() -> None:
    import tokenspeed_kernels

    for op in ("mla_decode", "mla_prefill", "merge_attn_states", "moe_route", "fused_moe"):
        assert registry.select(op, CPU, torch.float32).backend == "native_cpu"
    for op in ("mla_prefill", "moe_route", "fused_moe"):  # portable Triton kernels serve any sm80+ GPU
        assert registry.select(op, B200, torch.bfloat16).backend == "triton"
        assert registry.select(op, A100, torch.bfloat16).backend == "triton"
    cuda_built = tokenspeed_kernels.build_info()["cuda"]
    # The sm90 prefill and MoE kernels (verified on an H100) outrank Triton on Hopper in a CUDA build.
    sm90 = "cuda_sm90" if cuda_built else "triton"
    assert registry.select("mla_prefill", H100, torch.bfloat16, head_dim_qk=192, head_dim_v=128).backend == sm90
    assert registry.select("fused_moe", H100, torch.bfloat16).backend == sm90
    if cuda_built:
        with registry.use_backend("cuda_sm90", "mla_prefill"):
            assert registry.select("mla_prefill", H100, torch.bfloat16, head_dim_qk=192, head_dim_v=128).backend == "cuda_sm90"
    assert registry.select("mla_prefill", H100, torch.bfloat16, head_dim_qk=128, head_dim_v=128).backend == "triton"
    assert registry.select("mla_prefill", H100, torch.bfloat16, head_dim_qk=576, head_dim_v=512).backend == "reference"
    deepseek = dict(page_size=64, heads=16, q_len=2, head_dim=576)
    assert registry.select("mla_decode", H100, torch.bfloat16, **deepseek).backend == ("cuda_sm90" if cuda_built else "triton")
    assert registry.select("mla_decode", B200, torch.bfloat16, **deepseek).backend == "triton"  # sm90 kernel refuses sm100
    assert registry.select("mla_decode", A100, torch.bfloat16, **deepseek).backend == "triton"
    assert registry.select("mla_decode", H100, torch.bfloat16, **{**deepseek, "q_len": 9}).backend == "reference"
    assert registry.select("mla_decode", H100, torch.float32, **deepseek).backend == "reference"
    merge = registry.select("merge_attn_states", H100, torch.bfloat16)
    assert merge.backend == ("cuda" if cuda_built else "reference")


def test_device_info_of_cpu() -> None:
    assert DeviceInfo.of("cpu") == CPU
    assert DeviceInfo.of(torch.device("cpu")).vendor == "cpu"


def test_verified_only_refuses_unverified_kernels_unless_forced() -> None:
    op = "toy_unverified"
    registry.register(op, "reference", lambda: "reference")
    registry.register(op, "new_kernel", lambda: "new", priority=registry.Priority.UNVERIFIED)
    try:
        assert registry.select(op, H100, torch.bfloat16).backend == "new_kernel"
        assert registry.select(op, H100, torch.bfloat16, verified_only=True).backend == "reference"
        reasons = {k.backend: why for k, why in registry.explain(op, H100, torch.bfloat16, verified_only=True)}
        assert "UNVERIFIED" in reasons["new_kernel"] and reasons["reference"] is None
        with registry.use_backend("new_kernel", op=op):
            assert registry.select(op, H100, torch.bfloat16, verified_only=True).backend == "new_kernel"
    finally:
        registry.unregister(op, "reference")
        registry.unregister(op, "new_kernel")


def test_select_cache_follows_registrations_and_overrides(monkeypatch) -> None:
    op = "toy_cached"
    registry.register(op, "reference", lambda: "reference")
    try:
        assert registry.select(op, H100, torch.bfloat16).backend == "reference"
        registry.register(op, "fast", lambda: "fast", priority=registry.Priority.PERFORMANT)
        assert registry.select(op, H100, torch.bfloat16).backend == "fast"  # a registration empties the cache
        with registry.use_backend("reference", op=op):
            assert registry.select(op, H100, torch.bfloat16).backend == "reference"
        monkeypatch.setenv(env.KERNEL_BACKEND, f"{op}=reference")
        assert registry.select(op, H100, torch.bfloat16).backend == "reference"
        monkeypatch.delenv(env.KERNEL_BACKEND)
        assert registry.select(op, H100, torch.bfloat16).backend == "fast"
        registry.unregister(op, "fast")
        assert registry.select(op, H100, torch.bfloat16).backend == "reference"
        assert registry.select(op, H100, torch.bfloat16, page_size=[64]).backend == "reference"  # unhashable: uncached
    finally:
        registry.unregister(op, "reference")
        registry.unregister(op, "fast")
