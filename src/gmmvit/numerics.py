"""Which CPU kernels compute a cell, and the facts about the CPU that decide its bits.

Two settings (config key ``numerics``, ``gmmvit train --numerics``):

- ``portable``: kernels whose float results do not depend on the CPU's make, model, features or
  cache sizes, on any x86-64 CPU with AVX2 (proven with emulated Intel and AMD CPUs by
  tests/test_numerics.py). MKL in its conditional-numerical-reproducibility mode COMPATIBLE
  (MKL_CBWR), ATen's AVX2 kernels (ATEN_CPU_CAPABILITY), oneDNN off, one intra-op thread, and the
  fused AdamW (the default one takes MKL's square root, which is not portable even under
  COMPATIBLE). MKL and ATen read their variables once, when loaded: :func:`apply_environment`
  sets them before torch is imported, and :func:`check_portable` refuses to train when they
  did not take.
- ``native``: the fastest kernels this CPU offers; results are tied to the CPU model.

CUDA cells keep their own deterministic settings: ``portable`` is about CPUs.
This module imports no torch at import time (the CLI calls :func:`apply_environment` first).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import re
from typing import Any

from .errors import UserError

NUMERICS = ("portable", "native")
# What `portable` sets before torch loads. MKL_CBWR=COMPATIBLE: MKL's code path that gives the same
# bits on Intel and AMD (AVX2,STRICT does not: small GEMMs and MKL's vector math differ by make).
PORTABLE_ENVIRONMENT = {
    "MKL_CBWR": "COMPATIBLE",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
}
# Every variable that changes which kernels run or how many threads they use: recorded per cell.
KERNEL_VARIABLES = (
    "MKL_CBWR", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE",
    "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ONEDNN_DEFAULT_FPMATH_MODE", "MKL_NUM_THREADS",
    "OMP_NUM_THREADS", "MKL_DYNAMIC", "OMP_DYNAMIC", "KMP_AFFINITY", "GOMP_CPU_AFFINITY",
    "GMMVIT_THREADS", "TORCH_MKLDNN_MATMUL_MIN_DIM", "CUBLAS_WORKSPACE_CONFIG",
)
_MKL_CBWR_BRANCH = 1  # mkl_cbwr_get(MKL_CBWR_BRANCH): the branch in force
_MKL_BRANCHES = {1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1",
                 8: "SSE4_2", 9: "AVX", 10: "AVX2", 12: "AVX512", 13: "AVX512_MIC"}


class NumericsError(UserError, RuntimeError):
    """The numerics a cell asked for are not in force."""


def check_name(numerics: str) -> str:
    if numerics not in NUMERICS:
        raise ValueError(f"unknown numerics {numerics!r}; valid: {', '.join(NUMERICS)}")
    return numerics


def apply_environment(numerics: str) -> None:
    """Set what ``numerics`` needs before torch loads (a no-op for ``native``)."""
    if check_name(numerics) == "portable":
        os.environ.update(PORTABLE_ENVIRONMENT)


def kernel_environment() -> dict[str, str]:
    """The kernel- and thread-choosing variables set in this process."""
    return {k: os.environ[k] for k in KERNEL_VARIABLES if k in os.environ}


# ---------------------------------------------------------------- the CPU, from CPUID


# CPUID run in this process, on the CPU the program sees: /proc/cpuinfo and libraries that run
# CPUID in a child process report the host, not an emulated CPU (qemu-user answers CPUID for the
# emulated one). x86-64 System V: cpuid(leaf=edi, subleaf=esi, out=rdx) writes eax, ebx, ecx, edx.
_CPUID_CODE = bytes([
    0x53,                    # push rbx (callee-saved; cpuid writes it)
    0x89, 0xF8,              # mov eax, edi
    0x89, 0xF1,              # mov ecx, esi
    0x49, 0x89, 0xD0,        # mov r8, rdx
    0x0F, 0xA2,              # cpuid
    0x41, 0x89, 0x00,        # mov [r8], eax
    0x41, 0x89, 0x58, 0x04,  # mov [r8+4], ebx
    0x41, 0x89, 0x48, 0x08,  # mov [r8+8], ecx
    0x41, 0x89, 0x50, 0x0C,  # mov [r8+12], edx
    0x5B,                    # pop rbx
    0xC3,                    # ret
])


class _Cpuid:
    def __init__(self) -> None:
        self._page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._page.write(_CPUID_CODE)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self._page))
        self._call = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32,
                                      ctypes.POINTER(ctypes.c_uint32 * 4))(address)

    def __call__(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        out = (ctypes.c_uint32 * 4)()
        self._call(leaf, subleaf, ctypes.byref(out))
        return tuple(out)


def _bit(value: int, bit: int) -> bool:
    return bool(value >> bit & 1)


def _caches(cpuid: _Cpuid, leaf: int) -> dict[str, int]:
    """Data / unified cache sizes in KiB by level, from the deterministic cache leaf (4 on Intel,
    0x8000001D on AMD: the same layout)."""
    sizes: dict[str, int] = {}
    for index in range(16):
        eax, ebx, ecx, _ = cpuid(leaf, index)
        kind = eax & 0x1F
        if kind == 0:
            break
        if kind == 2:  # instruction cache
            continue
        level = (eax >> 5) & 0x7
        ways, partitions, line = (ebx >> 22) + 1, ((ebx >> 12) & 0x3FF) + 1, (ebx & 0xFFF) + 1
        sizes[f"l{level}_kib"] = ways * partitions * line * (ecx + 1) // 1024
    return sizes


def cpu_facts() -> dict[str, Any]:
    """The CPU's make, model and the features and cache sizes that pick kernels, read with CPUID.
    Off x86-64: what the platform module says."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {"vendor": None, "model_name": platform.processor() or platform.machine()}
    cpuid = _Cpuid()
    top, ebx, ecx, edx = cpuid(0)
    vendor = b"".join(r.to_bytes(4, "little") for r in (ebx, edx, ecx)).decode(errors="replace")
    eax1 = cpuid(1)[0]
    base_family, base_model = (eax1 >> 8) & 0xF, (eax1 >> 4) & 0xF
    family = base_family + ((eax1 >> 20) & 0xFF if base_family == 0xF else 0)
    model = base_model + (((eax1 >> 16) & 0xF) << 4 if base_family in (6, 0xF) else 0)
    top_ext = cpuid(0x80000000)[0]
    name = b"".join(r.to_bytes(4, "little") for leaf in (0x80000002, 0x80000003, 0x80000004)
                    for r in cpuid(leaf)) if top_ext >= 0x80000004 else b""
    _, ebx7, _, edx7 = cpuid(7) if top >= 7 else (0, 0, 0, 0)
    eax7_1 = cpuid(7, 1)[0] if top >= 7 else 0
    flags = {"avx2": _bit(ebx7, 5), "avx512f": _bit(ebx7, 16), "avx512_bf16": _bit(eax7_1, 5),
             "amx_tile": _bit(edx7, 24), "amx_bf16": _bit(edx7, 22)}
    if vendor == "AuthenticAMD" and top_ext >= 0x8000001D:
        caches = _caches(cpuid, 0x8000001D)
    else:
        caches = _caches(cpuid, 4) if top >= 4 else {}
    return {
        "vendor": vendor,
        "model_name": re.sub(r"\s+", " ", name.rstrip(b"\0").decode(errors="replace")).strip() or None,
        "family": family, "model": model, "stepping": eax1 & 0xF,
        "flags": sorted(k for k, on in flags.items() if on),
        "l2_kib": caches.get("l2_kib"), "l3_kib": caches.get("l3_kib"),
    }


# ---------------------------------------------------------------- what torch loaded (needs torch)


def _torch_cpu_library():
    import torch

    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    return ctypes.CDLL(path) if os.path.exists(path) else None


def mkl_branch() -> str | None:
    """MKL's conditional-numerical-reproducibility branch in force (COMPATIBLE, AVX2, OFF...), or
    None where this torch has no MKL whose branch can be read."""
    lib = _torch_cpu_library()
    get = getattr(lib, "mkl_serv_cbwr_get", None) if lib is not None else None
    if get is None:
        return None
    get.restype, get.argtypes = ctypes.c_int, [ctypes.c_int]
    code = get(_MKL_CBWR_BRANCH)
    return _MKL_BRANCHES.get(code, str(code))


def library_versions() -> dict[str, str | None]:
    """MKL and oneDNN as torch was built with them (torch.__config__.show())."""
    import torch

    shown = torch.__config__.show()
    mkl = re.search(r"Math Kernel Library Version ([^\s]+)", shown)
    onednn = re.search(r"MKL-DNN v([0-9][^\s]*)", shown)
    return {"mkl": mkl.group(1) if mkl else None, "onednn": onednn.group(1) if onednn else None}


def configure(numerics: str, device_type: str, threads: int | None) -> None:
    """Put the in-process part of ``numerics`` in force (after torch loaded) and check the part
    that had to be set before; raise :class:`NumericsError` when a portable cell cannot have it."""
    import torch

    if check_name(numerics) == "native":
        return
    if device_type != "cpu":
        return  # CUDA cells: their deterministic settings (train.set_determinism) apply
    if threads not in (None, 1):  # asked for explicitly; a count from the environment is overridden
        raise NumericsError(
            f"portable numerics trains on one thread (more threads change the order of sums); "
            f"asked for {threads}: use --threads 1 or --numerics native")
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False  # oneDNN picks its blocking by cache sizes
    check_portable()


def check_portable() -> None:
    """Raise unless MKL's COMPATIBLE branch and ATen's AVX2 kernels are in force."""
    import torch

    hint = ("set by gmmvit before torch loads: run `gmmvit train --numerics portable` as a process "
            "of its own, or start Python with " + " ".join(f"{k}={v}" for k, v in PORTABLE_ENVIRONMENT.items()))
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX2":
        raise NumericsError(
            f"portable numerics needs ATen's AVX2 kernels, but they are {capability}"
            + (" (this CPU has no AVX2)" if capability in ("DEFAULT", "NO AVX") else f"; {hint}"))
    branch = mkl_branch()
    if branch != "COMPATIBLE":
        raise NumericsError(
            "portable numerics needs MKL in its COMPATIBLE mode, but "
            + (f"it is {branch}; {hint}" if branch else "this torch has no MKL whose mode can be read "
               "(portable numerics is proven for x86-64 builds with MKL); use --numerics native"))


def provenance(numerics: str) -> dict[str, Any]:
    """The facts a cell's record keeps about its numerics and CPU (the MKL and oneDNN versions go
    with the other versions: :func:`library_versions`)."""
    import torch

    return {
        "numerics": numerics,
        "cpu": cpu_facts(),
        "mkl_branch": mkl_branch(),
        "onednn_enabled": bool(torch.backends.mkldnn.enabled),
        "kernel_environment": kernel_environment(),
    }


def cpu_label(facts: dict[str, Any] | None) -> str:
    """"AMD EPYC 7B13 (AuthenticAMD 25/1/1)": the model a table names."""
    if not facts:
        return "CPU model unknown"
    name = facts.get("model_name") or "unnamed CPU"
    if facts.get("family") is None:
        return name
    return f"{name} ({facts.get('vendor')} family {facts['family']} model {facts['model']} stepping {facts['stepping']})"
