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
    monkeypatch.setattr(lion_ops, "__path__", [str(package)])
    with pytest.raises(_native.NativeLibraryError, match="unbuilt source checkout"):
        _native._library_path()
    (tmp_path / "CMakeLists.txt").unlink()
    with pytest.raises(_native.NativeLibraryError, match="is missing from"):
        _native._library_path()


def test_an_editable_install_finds_the_library_in_the_installed_directory(tmp_path, monkeypatch):
    """scikit-build-core's editable install imports the Python files from the source tree and
    puts the built library in site-packages; the package's __path__ lists both."""
    source, installed = tmp_path / "src" / "lion_ops", tmp_path / "site" / "lion_ops"
    source.mkdir(parents=True)
    installed.mkdir(parents=True)
    (tmp_path / "src" / "CMakeLists.txt").write_text("")
    (installed / "liblion_ops_native.so").write_bytes(b"")
    monkeypatch.setattr(_native, "__file__", str(source / "_native.py"))
    monkeypatch.setattr(lion_ops, "__path__", [str(source), str(installed)])
    assert _native._library_path() == str(installed / "liblion_ops_native.so")


def test_a_library_that_cannot_load_says_why(tmp_path):
    """The system loader's reason (here: not an ELF file), not only torch's wrapper."""
    library = tmp_path / "liblion_ops_native.so"
    library.write_bytes(b"not a shared library" * 100)
    with pytest.raises(_native.NativeLibraryError,
                       match=r"could not load .*liblion_ops_native.so: .*invalid ELF header"):
        _native._load_library(str(library))


def test_torch_version_mismatch_says_which():
    info = types.SimpleNamespace(TORCH_VERSION="2.0.0+cu999")
    with pytest.raises(_native.NativeLibraryError,
                       match=r"built against torch 2\.0\.0\+cu999, but torch .* is installed"):
        _native._check_torch_version(info)
    _native._check_torch_version(types.SimpleNamespace(TORCH_VERSION=torch.__version__))
    # A library with CUDA kernels needs torch's CUDA libraries of the version it was built for.
    other_cuda = types.SimpleNamespace(TORCH_VERSION=torch.__version__, WITH_CUDA=True,
                                       TORCH_CUDA_VERSION="9.9")
    with pytest.raises(_native.NativeLibraryError, match=r"\(CUDA 9\.9\), but torch"):
        _native._check_torch_version(other_cuda)


def test_public_names():
    names = {"Lion", "Lion8bit", "Lion32bit", "PagedLion", "PagedLion8bit", "PagedLion32bit"}
    assert names <= set(lion_ops.__all__)
    assert names <= set(lion_ops.optim.__all__)


def test_cuda_params_with_a_library_built_without_cuda_kernels_say_so(monkeypatch):
    """Without CUDA kernels (no nvcc when it was built), a CUDA param is refused where the
    optimizer is made, saying how to rebuild, rather than by torch's generic "Could not run
    'lion::...' with arguments from the 'CUDA' backend" at the first step."""
    from lion_ops.optim import base
    monkeypatch.setattr(base, "_CUDA_KERNELS_BUILT", False)
    assert base._device_problem(torch.device("cpu")) == ""
    assert "built without CUDA kernels" in base._device_problem(torch.device("cuda", 1))
    opt = lion_ops.Lion([torch.nn.Parameter(torch.randn(3))])
    cuda_param = types.SimpleNamespace(device=torch.device("cuda", 0))
    with pytest.raises(RuntimeError, match=r"Lion: a param is on cuda:0, but this lion_ops was "
                                           r"built without CUDA kernels .* LION_OPS_CUDA=ON"):
        opt._note_paging_devices([{"params": [cuda_param]}])
