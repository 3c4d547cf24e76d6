"""The native library: loaded once, complete (every operator has a fake, a CPU kernel and,
when CUDA was built, a CUDA kernel), and clear about why it cannot load."""

import os
import types

import pytest
import torch

import lion_ops
from lion_ops import _native


def _lion_operators():
    return sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("lion::"))


def test_every_operator_has_fake_and_kernels():
    names = _lion_operators()
    assert "lion::lion_update_32bit" in names
    for name in names:
        namespace, op_name = name.split("::")
        schema = getattr(getattr(torch.ops, namespace), op_name).default._schema
        if not any("Tensor" in str(a.type) for a in (*schema.arguments, *schema.returns)):
            # A query about a device (paging_support): no tensors to fake, one kernel for all.
            assert torch._C._dispatch_has_kernel_for_dispatch_key(
                name, "CompositeExplicitAutograd"), f"{name}: no kernel"
            continue
        entry = torch._library.simple_registry.singleton.find(name)
        assert entry.fake_impl.kernel is not None, f"{name} has no fake"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), f"{name}: no CPU kernel"
        if _native.cuda_kernels_built():
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), f"{name}: no CUDA kernel"


def test_cuda_kernels_were_built_when_required():
    # CI sets this: its machine has no GPU, but the CUDA kernels must still compile and register.
    if os.environ.get("LION_OPS_REQUIRE_CUDA_BUILD") != "1":
        pytest.skip("LION_OPS_REQUIRE_CUDA_BUILD is not set")
    assert _native.cuda_kernels_built()
    from lion_ops import _build_info
    assert _build_info.WITH_CUDA and "90" in _build_info.CUDA_ARCHITECTURES


def test_loading_twice_is_harmless():
    _native.load()
    _native.load()


def test_missing_library_in_a_source_checkout_says_why(tmp_path, monkeypatch):
    package = tmp_path / "lion_ops"
    package.mkdir()
    (tmp_path / "CMakeLists.txt").write_text("")
    monkeypatch.setattr(_native, "__file__", str(package / "_native.py"))
    with pytest.raises(_native.NativeLibraryError, match="unbuilt source checkout"):
        _native._library_path()
    (tmp_path / "CMakeLists.txt").unlink()
    with pytest.raises(_native.NativeLibraryError, match="is missing from"):
        _native._library_path()


def test_torch_version_mismatch_says_which():
    info = types.SimpleNamespace(TORCH_VERSION="2.0.0+cu999")
    with pytest.raises(_native.NativeLibraryError,
                       match=r"built against torch 2\.0\.0\+cu999, but torch .* is installed"):
        _native._check_torch_version(info)
    _native._check_torch_version(types.SimpleNamespace(TORCH_VERSION=torch.__version__))


def test_public_names():
    names = {"Lion", "Lion8bit", "Lion32bit", "PagedLion", "PagedLion8bit", "PagedLion32bit"}
    assert names <= set(lion_ops.__all__)
    assert names <= set(lion_ops.optim.__all__)
