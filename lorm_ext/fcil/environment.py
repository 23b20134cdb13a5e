"""Which CPU kernels a run uses, and the record of the machine it ran on.

The same float32 run gives different numbers on CPUs whose libraries pick different kernels: ATen's
vectorised kernels (AVX-512 or AVX2), oneDNN's convolution, MKL's GEMM (each dispatches on the CPU at first
use). ``lorm-fcil`` therefore starts its process with the switches of ``CPU_ENVIRONMENT`` (docs/fcil.md,
"Reproducing the numbers"): they are read when torch and its libraries first run, so they must be in the
environment before torch is imported, which is why the command line re-executes itself with them. A
variable the user has set is kept. ``pin_cpu_kernels`` also routes convolutions around oneDNN (whose blocking
follows the cache sizes) to ATen's im2col + MKL GEMM.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys

# ATen and oneDNN take their AVX2 kernels on every x86 CPU with AVX2 (AVX-512 ones would differ from an AVX2
# machine's); MKL's COMPATIBLE branch is the one code path it promises on Intel and non-Intel CPUs alike.
CPU_ENVIRONMENT = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "COMPATIBLE"}
# Set (to anything) to run with the libraries' own dispatch instead.
NATIVE_KERNELS = "LORM_EXT_NATIVE_KERNELS"


def missing_cpu_environment() -> dict[str, str]:
    """The switches of CPU_ENVIRONMENT this process was not started with (empty when opted out)."""
    if NATIVE_KERNELS in os.environ:
        return {}
    return {k: v for k, v in CPU_ENVIRONMENT.items() if k not in os.environ}


def reexec_with_cpu_environment(module: str) -> None:
    """Replaces this process by ``python -m module <same arguments>`` with the missing switches set; returns
    only when nothing is missing."""
    missing = missing_cpu_environment()
    if missing:
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], os.environ | missing)


def pin_cpu_kernels() -> None:
    """The in-process part of the settings: no oneDNN (see the module docstring); a no-op when opted out."""
    import torch

    if NATIVE_KERNELS not in os.environ:
        torch.backends.mkldnn.enabled = False


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def code_record() -> dict:
    """Which code made a run: the sha256 of the package's Python sources (the same on every machine, unlike the
    compiled extension) and, when the package sits in a git checkout, its commit and whether it had edits."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(package):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, package).encode() + b"\0")
            with open(path, "rb") as file:
                digest.update(file.read() + b"\0")
    record = {"source_sha256": digest.hexdigest(), "git_commit": None, "git_dirty": None}
    try:
        git = ["git", "-C", package]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            status = subprocess.run(
                [*git, "status", "--porcelain", "--", "."], capture_output=True, text=True, timeout=10
            )
            record |= {"git_commit": commit.stdout.strip(), "git_dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        pass
    return record


def machine_record(weights: str | None) -> dict:
    """What a reader needs to tell two runs' machines apart: CPU model and ISA, the kernels torch used, the
    threads, the switches of CPU_ENVIRONMENT as this process has them, the backbone file's sha256."""
    import torch

    flags = _cpu_flags()
    isa = [name for name in ("avx512f", "avx2", "fma", "avx") if name in flags]
    return {
        "cpu_model": _cpu_model(),
        "cpu_isa": "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else (isa[0] if isa else "?"),
        "cpu_flags": isa,
        "cpu_count": os.cpu_count(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "onednn": torch.backends.mkldnn.enabled,
        "variables": {k: os.environ.get(k) for k in [*CPU_ENVIRONMENT, NATIVE_KERNELS]},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "backbone_sha256": file_sha256(weights) if weights is not None else None,
        "code": code_record(),
    }


# What must match for a finished run's results to stand for a run made here and now (``provenance_changes``).
PROVENANCE = ("code", "torch", "cpu_model", "cpu_isa", "variables")


def provenance(environment: dict) -> dict:
    """The fields of PROVENANCE of a ``machine_record`` (the code as its sources' sha256; None: not recorded)."""
    return {
        key: (environment.get(key) or {}).get("source_sha256") if key == "code" else environment.get(key)
        for key in PROVENANCE
    }


def provenance_changes(recorded: dict, current: dict) -> list[str]:
    """How the ``provenance`` of a finished run differs from the current one, one phrase per field."""
    changes = []
    for key in PROVENANCE:
        then, now = recorded.get(key), current.get(key)
        if then == now:
            continue
        if key == "code":
            changes.append(
                "by code whose version it does not record"
                if then is None
                else f"by other code (sources sha256 {then[:12]}…, here {now[:12]}…)"
            )
        else:
            changes.append(f"with {key} {then!r} (here {now!r})")
    return changes
