"""Builds the CPU emulation of the CUDA kernels and host code (tests only).

native/cuda/lion_kernels.cu is copied into the build directory with every
`kernel<<<grid, block, shared, stream>>>(args);` rewritten into
`::lion_emu::launch("kernel", [=] { kernel(args); }, grid, block, shared, stream);`,
then compiled with g++ together with the fiber runtime (emu_runtime.cpp), the unchanged CUDA
host code (native/cuda/lion_cuda.cpp, through emu_host.cpp) and the argument checks
(native/lion_batch.cpp), into one library that registers torch.ops.lion_emu.*.
"""

from __future__ import annotations

import os
import re
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
NATIVE = os.path.join(REPO, "native")
KERNELS = os.path.join(NATIVE, "cuda", "lion_kernels.cu")
NEEDED_SOURCES = [
    KERNELS,
    os.path.join(NATIVE, "cuda", "lion_cuda.cpp"),
    os.path.join(NATIVE, "cuda", "lion_kernels.cuh"),
    os.path.join(NATIVE, "lion_batch.cpp"),
    os.path.join(NATIVE, "lion_batch.h"),
    os.path.join(NATIVE, "lion_math.h"),
]
NEEDED_CUDA_HEADERS = ["cuda_runtime_api.h", "cuda_bf16.h", "cuda_fp16.h", "vector_types.h"]
LIBRARY_NAME = "lion_cuda_emulation"
# The CPU library's flags (CMakeLists.txt: -O3 -ffp-contract=off -fno-trapping-math; the CUDA
# build uses --fmad=false), so neither side fuses multiply-adds. -O2 builds faster.
# -fsanitize=alignment traps (SIGILL, no runtime library) on an access through a pointer not
# aligned for its type, as a GPU faults on a misaligned vector access (uint2, a Pack): the CPU
# would tolerate it and a wrong alignment test in the kernels would go unseen.
CFLAGS = [
    "-O2",
    "-ffp-contract=off",
    "-fsanitize=alignment",
    "-fsanitize-undefined-trap-on-error",
    "-fno-trapping-math",
    "-fvisibility=hidden",
    "-fvisibility-inlines-hidden",
    "-Wall",
    "-Wno-unused-parameter",
    "-Wno-unknown-pragmas",
    "-Wno-sign-compare",
]

# A kernel (a name, maybe qualified, with template arguments without nested <>), then the
# launch configuration up to >>>; the arguments are matched by counting parentheses.
_LAUNCH = re.compile(
    r"(?P<kernel>[A-Za-z_][\w:]*(?:\s*<[^<>;{}()]*>)?)\s*<<<(?P<config>.*?)>>>\s*\(", re.S
)


def rewrite_launches(source: str) -> tuple[str, int]:
    """Returns the source with every launch rewritten, and the number of launches."""
    out = []
    position = 0
    count = 0
    for match in _LAUNCH.finditer(source):
        if match.start() < position:
            raise RuntimeError(f"cuda emulation: overlapping launch at offset {match.start()}")
        depth = 1
        i = match.end()
        while depth > 0:
            if i >= len(source):
                raise RuntimeError("cuda emulation: unbalanced launch arguments")
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        args = source[match.end():i - 1]
        semicolon = re.compile(r"\s*;").match(source, i)
        if semicolon is None:
            raise RuntimeError(f"cuda emulation: a launch not followed by ';': {match.group(0)!r}")
        end = semicolon.end()
        kernel = " ".join(match.group("kernel").split())
        config = match.group("config").strip()
        replacement = (f'::lion_emu::launch("{kernel}", [=] {{ {kernel}({args}); }}, '
                       f"{config});")
        # Keep the line count, so that compiler messages point at the right lines of the .cu.
        original = source[match.start():end]
        replacement = replacement.replace("\n", " ") + "\n" * original.count("\n")
        out.append(source[position:match.start()])
        out.append(replacement)
        position = end
        count += 1
    out.append(source[position:])
    return "".join(out), count


# `__shared__ T name[N]...;` (arrays or scalars), one declarator.
_SHARED = re.compile(r"__shared__\s+(?P<type>[^;\[\]]+?)\s+(?P<name>\w+)\s*(?P<dims>(?:\[[^\]]*\]\s*)*);")


def rewrite_shared(source: str) -> tuple[str, int]:
    """Makes every __shared__ variable a static one that the runtime poisons per block."""
    def replace(match):
        name = match.group("name")
        dims = "".join(match.group("dims").split())
        return (f"static {match.group('type')} {name}{dims}; "
                f"::lion_emu::declare_shared(&{name}, sizeof({name}));")
    return _SHARED.subn(replace, source)


def missing_prerequisites() -> str | None:
    """Why the emulation cannot be built here, or None."""
    for path in NEEDED_SOURCES:
        if not os.path.isfile(path):
            return f"CUDA sources not found ({path})"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler"
    include = cuda_include_dir()
    if include is None:
        return ("CUDA headers (cuda_runtime_api.h, cuda_bf16.h, cuda_fp16.h) not found; set "
                "CUDA_HOME")
    return None


def cuda_include_dir() -> str | None:
    candidates = []
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            candidates.append(os.environ[variable])
    try:
        from torch.utils.cpp_extension import CUDA_HOME
        if CUDA_HOME:
            candidates.append(CUDA_HOME)
    except Exception:
        pass
    candidates.append("/usr/local/cuda")
    for home in candidates:
        include = os.path.join(home, "include")
        if all(os.path.isfile(os.path.join(include, h)) for h in NEEDED_CUDA_HEADERS):
            return include
    return None


def _write_if_changed(path: str, text: str) -> None:
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return  # keep the timestamp, so ninja does not rebuild
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


_CU_INCLUDE = re.compile(r'^#include\s+"(?P<name>[^"]+\.cu)"[^\n]*$', re.M)


def _inline_cu_includes(source: str, path: str) -> str:
    """Replaces each `#include "x.cu"` (looked up beside `path`, then in native/cuda) by that
    file's text, with #line markers, so that its launches are rewritten too."""
    def replace(match):
        name = match.group("name")
        for directory in (os.path.dirname(path), os.path.join(NATIVE, "cuda")):
            included = os.path.join(directory, name)
            if os.path.isfile(included):
                break
        else:
            raise RuntimeError(f"cuda emulation: {path} includes {name}, not found")
        with open(included, encoding="utf-8") as f:
            text = _inline_cu_includes(f.read(), included)
        line = source.count("\n", 0, match.start()) + 2
        return (f'#line 1 "{included}"\n{text}\n'
                f'#line {line} "{path}"')
    return _CU_INCLUDE.sub(replace, source)


def _prepare(cuda_source: str, destination: str) -> str:
    """Writes the C++ form of a CUDA source file (launches and __shared__ rewritten; .cu files
    it includes inlined first)."""
    with open(cuda_source, encoding="utf-8") as f:
        source = _inline_cu_includes(f.read(), cuda_source)
    launches = source.count("<<<")
    rewritten, count = rewrite_launches(source)
    if count != launches or "<<<" in rewritten or ">>>" in rewritten:
        raise RuntimeError(f"cuda emulation: rewrote {count} of the {launches} launches "
                           f"(`<<<`) in {cuda_source}")
    shared = len(re.findall(r"\b__shared__\b", rewritten))
    rewritten, count = rewrite_shared(rewritten)
    if count != shared:
        raise RuntimeError(f"cuda emulation: rewrote {count} of the {shared} __shared__ "
                           f"declarations in {cuda_source}")
    path = cuda_source.replace("\\", "/")
    _write_if_changed(destination, f'#include "cuda_emu.h"\n#line 1 "{path}"\n{rewritten}')
    return destination


EMULATED_OPERATORS = ("lion_update_32bit", "lion_update_8bit_blockwise", "lion_update_8bit_static",
                      "percentile_clipping", "increment_steps", "quantize_blockwise",
                      "dequantize_blockwise")


def operator_schemas() -> dict[str, str]:
    """The schema strings of native/registration.cpp's m.def calls (adjacent string literals
    joined), by operator name, so the emulated ops take exactly the real arguments."""
    with open(os.path.join(NATIVE, "registration.cpp"), encoding="utf-8") as f:
        source = f.read()
    schemas = {}
    for call in re.finditer(r"m\.def\(\s*((?:\"[^\"]*\"\s*)+)\)", source):
        schema = "".join(re.findall(r'"([^"]*)"', call.group(1)))
        schemas[schema.split("(", 1)[0]] = schema
    missing = [name for name in EMULATED_OPERATORS if name not in schemas]
    if missing:
        raise RuntimeError(f"cuda emulation: no schema for {missing} in native/registration.cpp")
    return schemas


def _write_schemas(destination: str) -> None:
    schemas = operator_schemas()
    lines = [f'#define LION_EMU_SCHEMA_{name} "{schemas[name]}"' for name in EMULATED_OPERATORS]
    _write_if_changed(destination, "#pragma once\n" + "\n".join(lines) + "\n")


def build(build_dir: str, verbose: bool = False) -> None:
    """Builds (or reuses) the emulation library and loads it into torch.ops.lion_emu."""
    import torch
    from torch.utils import cpp_extension

    os.makedirs(build_dir, exist_ok=True)
    kernels = _prepare(KERNELS, os.path.join(build_dir, "lion_kernels_emu.cpp"))
    selftest = _prepare(os.path.join(HERE, "emu_selftest.cu"),
                        os.path.join(build_dir, "emu_selftest_emu.cpp"))
    _write_schemas(os.path.join(build_dir, "emu_schemas.h"))

    include = cuda_include_dir()
    cpp_extension.load(
        name=LIBRARY_NAME,
        sources=[
            kernels,
            selftest,
            os.path.join(HERE, "emu_runtime.cpp"),
            os.path.join(HERE, "emu_host.cpp"),
            os.path.join(NATIVE, "lion_batch.cpp"),
        ],
        # The c10/cuda shims first; native/cuda for lion_kernels.cu's "../lion_math.h".
        extra_include_paths=[os.path.join(HERE, "include"), HERE, build_dir, NATIVE,
                             os.path.join(NATIVE, "cuda"), include],
        extra_cflags=CFLAGS,
        build_directory=build_dir,
        is_python_module=False,
        with_cuda=False,
        verbose=verbose,
    )
    if not hasattr(torch.ops.lion_emu, "lion_update_32bit"):
        raise RuntimeError("cuda emulation: the library loaded but registered no lion_emu ops")


KERNEL_SHAPES = os.path.join(REPO, "tools", "kernel_shapes.cu")


def build_kernel_shapes(build_dir: str, verbose: bool = False) -> str:
    """Builds (or reuses) the emulation of tools/kernel_shapes.cu (the 32-bit kernel in the
    shapes that tools/kernel_shapes.py times on a GPU): a plain shared library with its C
    interface, for ctypes. Returns its path."""
    from torch.utils import cpp_extension

    os.makedirs(build_dir, exist_ok=True)
    shapes = _prepare(KERNEL_SHAPES, os.path.join(build_dir, "kernel_shapes_emu.cpp"))
    name = "lion_kernel_shapes_emulation"
    cpp_extension.load(
        name=name,
        sources=[shapes, os.path.join(HERE, "emu_runtime.cpp")],
        extra_include_paths=[HERE, NATIVE, os.path.join(NATIVE, "cuda"), cuda_include_dir()],
        extra_cflags=CFLAGS,
        build_directory=build_dir,
        is_python_module=False,
        with_cuda=False,
        verbose=verbose,
    )
    return os.path.join(build_dir, f"{name}.so")
