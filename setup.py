"""Builds lorm_ext._C: the C++ ops always, the CUDA ops whenever the installed torch is a CUDA build.

LORM_EXT_CUDA=auto (default) builds CUDA when torch has CUDA and nvcc is found, =1 requires it, =0 skips it.
TORCH_CUDA_ARCH_LIST picks the GPU architectures (default "8.0;9.0+PTX": A100 and H100/H200 machine code, plus PTX that newer GPUs compile at load time).
"""

import glob
import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).parent
# lorm_ext/_install.py: the install advice and checks, loaded by path (importing lorm_ext needs the built library)
_spec = importlib.util.spec_from_file_location("lorm_ext_install", ROOT / "lorm_ext" / "_install.py")
install = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install)
# An isolated build (plain `pip install .`) would compile against a torch other than the target's: refuse now,
# before pip spends minutes compiling a library that cannot load there.
install.check_build_torch(sys.executable)

# torch derives CUDA_HOME from the nvcc on PATH, which misleads it when that nvcc is a wrapper script
# (as on these machines); the standard toolkit location is the better guess.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and Path("/usr/local/cuda/bin/nvcc").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

CPU_SOURCES = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
CUDA_SOURCES = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))


def want_cuda() -> bool:
    mode = os.environ.get("LORM_EXT_CUDA", "auto").lower()
    if mode not in {"auto", "0", "1"}:
        raise SystemExit(f"LORM_EXT_CUDA must be auto, 0 or 1, got {mode!r}")
    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if mode == "1" and not available:
        raise SystemExit(
            "LORM_EXT_CUDA=1 but the CUDA build is unavailable: torch.version.cuda="
            f"{torch.version.cuda!r}, CUDA_HOME={cpp_extension.CUDA_HOME!r} (set CUDA_HOME to the toolkit with nvcc)"
        )
    return mode != "0" and available


def nvidia_wheel_includes() -> list[str]:
    """cuBLAS/cuSOLVER headers that pip's CUDA torch ships under site-packages/nvidia/*/include."""
    try:
        import nvidia
    except ImportError:
        return []
    roots = [Path(p) for p in nvidia.__path__]
    return sorted(str(p) for root in roots for p in root.glob("*/include") if p.is_dir())


def extension():
    with_cuda = want_cuda()
    # -fopenmp: at::parallel_for is an inline template that runs its body serially unless the extension itself
    # is compiled with OpenMP (the library it then links, libgomp.so.1, is the one torch has loaded already);
    # -ffp-contract=fast: a·b + c may be one fused multiply-add (one rounding instead of two), as outside GCC's
    # strict ISO mode.
    cxx_flags = ["-O3", "-g0", "-fopenmp", "-ffp-contract=fast"]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        return cpp_extension.CUDAExtension(
            "lorm_ext._C",
            CPU_SOURCES + CUDA_SOURCES,
            include_dirs=nvidia_wheel_includes(),
            define_macros=[("LORM_EXT_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "lorm_ext._C", CPU_SOURCES, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"]
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": install.build_ext_command()},
)
