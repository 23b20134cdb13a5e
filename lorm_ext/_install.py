"""How lorm_ext must be installed, and the checks that say so when it was not (one owner of that advice).

``lorm_ext._C`` is compiled against one torch's C++ ABI and works only with that torch: it has to be built in
the environment that runs it, against the torch installed there (``pip install --no-build-isolation .``). An
isolated build compiles against whatever torch pip downloads into its temporary build environment instead. So:

- ``setup.py`` refuses, before compiling anything, a build whose torch is not the torch of the environment it
  installs into (``check_build_torch``), and writes the torch it compiled against beside the library
  (``build_ext_command``, file ``BUILD_INFO``);
- ``import lorm_ext`` compares that record with the torch it runs with, and turns a library that does not load
  for want of torch's libraries or symbols into the same advice (``load_extension``).

Only the standard library at import: setup.py loads this file by its path, before torch is imported.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

REBUILD_COMMAND = "pip install --no-build-isolation ."
BUILD_INFO = "_build_info.py"  # beside lorm_ext._C: TORCH_VERSION, the torch.__version__ it was compiled against
# What the dynamic loader says when the library was compiled against another torch (or loaded without one).
_TORCH_LOAD_FAILURE = re.compile(r"lib(c10|torch)\w*\.so|undefined symbol")


def rebuild_advice(problem: str) -> str:
    return (
        f"{problem}. lorm_ext's compiled ops work only with the torch they were built against: rebuild them in "
        f"this environment with `{REBUILD_COMMAND}` from the lorm_ext source folder (an isolated build, plain "
        f"`pip install .`, compiles against the torch pip downloads for the build, not against the installed one)"
    )


def build_info_text(torch_version: str) -> str:
    return f'"""Written by setup.py when it built lorm_ext._C."""\n\nTORCH_VERSION = {torch_version!r}\n'


def installed_torch_version(python: str = sys.executable) -> str | None:
    """The version of torch that ``python`` has installed, without the variables (PYTHONPATH,
    PYTHONNOUSERSITE) through which pip's isolated build puts its own torch in front; None without torch."""
    probe = "import importlib.metadata as m\ntry: print(m.version('torch'))\nexcept m.PackageNotFoundError: pass"
    result = subprocess.run([python, "-E", "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return result.stdout.strip() or None


def check_build_torch(python: str = sys.executable) -> None:
    """For setup.py, before torch is imported: SystemExit with the advice when the torch this process would
    compile against is not the torch installed for ``python`` (pip's isolated build). Without torch in the
    target environment there is nothing to compare; ``import lorm_ext`` checks the torch it ends up with."""
    try:
        build = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return  # setup.py's `import torch` says so next
    target = installed_torch_version(python)
    if target is not None and target != build:
        raise SystemExit(
            rebuild_advice(
                f"lorm_ext: this build would compile against torch {build}, but the environment it installs into "
                f"({python}) has torch {target}"
            )
        )


def build_ext_command():
    """setup.py's build_ext: torch's BuildExtension that also writes BUILD_INFO beside every library it built
    (in the build folder, which goes into the wheel, and, for in-place and editable builds, in the sources)."""
    import torch
    from torch.utils.cpp_extension import BuildExtension

    class BuildExtensionRecordingTorch(BuildExtension):
        def run(self) -> None:
            super().run()
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                package = self.get_ext_fullname(ext.name).rpartition(".")[0]
                folders = {os.path.join(self.build_lib, *package.split("."))}
                if self.inplace:
                    folders.add(build_py.get_package_dir(package))
                for folder in sorted(folders):
                    with open(os.path.join(folder, BUILD_INFO), "w") as file:
                        file.write(build_info_text(torch.__version__))

    return BuildExtensionRecordingTorch


def load_extension():
    """``lorm_ext._C``, or an ImportError with the rebuild advice when it was built against another torch, was
    never built, or does not load for want of torch's libraries or symbols."""
    import torch  # loads libc10/libtorch, which the extension links against

    try:
        built = importlib.import_module(f"{__package__}._build_info").TORCH_VERSION
    except ModuleNotFoundError as error:
        if error.name != f"{__package__}._build_info":
            raise
        built = None  # built before setup.py recorded the torch: the load below decides
    if built is not None and built != torch.__version__:
        raise ImportError(
            rebuild_advice(
                f"lorm_ext._C was built against torch {built}, but this environment has torch {torch.__version__}"
            )
        )
    try:
        return importlib.import_module(f"{__package__}._C")
    except ModuleNotFoundError as error:
        if error.name != f"{__package__}._C":
            raise
        raise ImportError(rebuild_advice("lorm_ext._C is not built")) from error
    except ImportError as error:
        if not _TORCH_LOAD_FAILURE.search(str(error)):
            raise
        raise ImportError(
            rebuild_advice(f"lorm_ext._C does not load with torch {torch.__version__} ({error})")
        ) from error


class MissingExtra(ImportError):
    """A feature's dependency is not installed; the message names the extra that provides it."""


@contextmanager
def needs_extra(extra: str, feature: str) -> Iterator[None]:
    """Imports inside the block come from lorm_ext's optional dependencies ``[extra]``: a missing one becomes a
    MissingExtra saying how to install them."""
    try:
        yield
    except ModuleNotFoundError as error:
        if error.name is None or error.name.partition(".")[0] == __package__:
            raise  # a module of lorm_ext itself: a bug, not an installation problem
        raise MissingExtra(
            f"{feature} needs {error.name}, which is not installed: install the optional dependencies of lorm_ext "
            f"that it needs with `pip install 'lorm_ext[{extra}]'`"
        ) from error
