"""Installing into someone else's environment: the declared dependencies suffice (each console script's --help
and every module, in a process that can import nothing else), and a library built against another torch,
or an isolated build against one, says how to rebuild instead of failing somewhere else."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pkgutil
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import lorm_ext
from lorm_ext import _install
from lorm_ext.fcil.environment import CPU_ENVIRONMENT

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
ADVICE = "`pip install --no-build-isolation .`"


def _own_requirements(extras) -> list[Requirement]:
    texts = PROJECT["dependencies"] + [r for e in extras for r in PROJECT["optional-dependencies"][e]]
    return [Requirement(t) for t in texts]


def declared_distributions(extras=()) -> set[str]:
    """The installed distributions that lorm_ext's dependencies (with ``extras``) pull in, transitively."""
    found, seen = set(), set()
    todo = [(r, "") for r in _own_requirements(extras)]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        if name == canonicalize_name(PROJECT["name"]):  # lorm_ext[fcil] inside another extra
            todo += [(r, "") for r in _own_requirements(req.extras)]
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here: it provides nothing the process below could import
        found.add(name)
        todo += [(Requirement(t), e) for t in dist.requires or [] for e in ("", *req.extras)]
    return found


def allowed_modules(extras=()) -> list[str]:
    """Top-level modules of the standard library, of lorm_ext and of the declared distributions."""
    dists = declared_distributions(extras)
    provided = {
        module
        for module, owners in importlib.metadata.packages_distributions().items()
        if any(canonicalize_name(d) in dists for d in owners)
    }
    return sorted(provided | set(sys.stdlib_module_names) | {"lorm_ext"})


# Runs argv[2] in a process whose path finder does not see any top-level module outside the JSON list argv[1]
# and the standard library's folder (which also holds modules such as _sysconfigdata_*), as if only those were
# installed: importing another one is a ModuleNotFoundError, importlib.util.find_spec says None. With the CPU
# switches of lorm-fcil set, its main() does not re-execute itself.
_RESTRICTED = textwrap.dedent(
    """
    import importlib.machinery, json, os, sys, sysconfig
    allowed = frozenset(json.loads(sys.argv[1]))
    paths = sysconfig.get_paths()
    stdlib = tuple(os.path.join(paths[k], "") for k in ("stdlib", "platstdlib"))
    installed = tuple(os.path.join(paths[k], "") for k in ("purelib", "platlib"))

    class DeclaredOnly(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            spec = super().find_spec(name, path, target)
            if spec is None or "." in name or name in allowed:
                return spec
            origin = spec.origin or ""
            return spec if origin.startswith(stdlib) and not origin.startswith(installed) else None

    sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = DeclaredOnly
    exec(sys.argv[2])
    """
)


def run_restricted(code: str, extras=(), **kwargs) -> subprocess.CompletedProcess:
    env = os.environ | CPU_ENVIRONMENT | {"PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", _RESTRICTED, json.dumps(allowed_modules(extras)), textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        **kwargs,
    )


def _skip_unless_installed(extras):
    for req in _own_requirements(extras):
        if canonicalize_name(req.name) != canonicalize_name(PROJECT["name"]):
            try:
                importlib.metadata.distribution(req.name)
            except importlib.metadata.PackageNotFoundError:
                pytest.skip(f"{req.name} (declared by the {extras} extra) is not installed here")


SCRIPT_CALLS = [(script, args) for script in PROJECT["scripts"] for args in (["--help"],)] + [
    ("lorm-merge", ["peft", "--help"]),
    ("lorm-merge", ["grams", "--help"]),
]


@pytest.mark.parametrize(("script", "args"), SCRIPT_CALLS, ids=[" ".join([s, *a]) for s, a in SCRIPT_CALLS])
def test_console_script_help_needs_only_the_declared_dependencies(script, args):
    module, _, function = PROJECT["scripts"][script].partition(":")
    result = run_restricted(
        f"""
        import sys
        from {module} import {function}
        sys.argv = [{script!r}, *{args!r}]
        sys.exit({function}())
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {script}"), result.stdout


def test_the_restricted_process_refuses_what_is_not_declared():
    result = run_restricted("import safetensors, tqdm\nimport timm")  # timm: declared by [fcil] only
    assert result.returncode == 1
    assert result.stderr.strip().endswith("ModuleNotFoundError: No module named 'timm'")


def _package_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(lorm_ext.__path__, "lorm_ext.") if m.name != "lorm_ext._C")


# Which extra each module of the package needs (base: the dependencies alone); every module is in one group.
NEEDS = {"fcil": ("lorm_ext.fcil", "lorm_ext.demo"), "flower": ("lorm_ext.flower",)}


def _group(module: str) -> str:
    for extra, prefixes in NEEDS.items():
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return extra
    return "base"


@pytest.mark.parametrize("extra", ["base", *NEEDS])
def test_every_module_imports_with_the_dependencies_of_its_extra(extra):
    extras = () if extra == "base" else (extra,)
    _skip_unless_installed(extras)
    modules = [m for m in _package_modules() if _group(m) == extra]
    assert modules
    result = run_restricted(f"import importlib\nfor m in {modules!r}: importlib.import_module(m)", extras)
    assert result.returncode == 0, result.stderr


def test_the_peft_extra_provides_what_lorm_merge_grams_imports():
    _skip_unless_installed(("peft",))
    assert run_restricted("from peft import PeftModel", ("peft",)).returncode == 0


@pytest.mark.parametrize(
    ("script", "args", "extra"),
    [
        ("lorm-fcil", ["--output_dir", "{tmp}/runs"], "fcil"),
        ("lorm-merge", ["grams", "--adapter", "{tmp}", "--model", "m:f", "--batches", "m:g", "-o", "{tmp}/g"], "peft"),
    ],
)
def test_a_missing_extra_is_one_line_saying_how_to_install_it(tmp_path, script, args, extra):
    module, _, function = PROJECT["scripts"][script].partition(":")
    argv = [a.format(tmp=tmp_path) for a in args]
    result = run_restricted(
        f"import sys\nfrom {module} import {function}\nsys.argv = [{script!r}, *{argv!r}]\nsys.exit({function}())"
    )
    assert result.returncode in (1, 2)
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith(f"{script}"), line
    assert line.endswith(
        f"is not installed: install the optional dependencies of lorm_ext that it needs with "
        f"`pip install 'lorm_ext[{extra}]'`"
    ), line
    assert not (tmp_path / "runs").exists()


def test_importing_lorm_ext_flower_without_its_extra_says_how_to_install_it():
    result = run_restricted("import lorm_ext.flower")  # the base dependencies only: no flwr
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "lorm_ext.flower needs flwr, which is not installed: install the optional dependencies of lorm_ext that it "
            "needs with `pip install 'lorm_ext[flower]'`"
        )
    ), result.stderr


def test_every_extra_of_all_is_declared():
    (everything,) = PROJECT["optional-dependencies"]["all"]
    assert set(Requirement(everything).extras) == set(PROJECT["optional-dependencies"]) - {"all"}


# --- the torch the library was built against


@pytest.fixture
def package_copy(tmp_path) -> Path:
    """A copy of the lorm_ext package (with its built library) whose build record a test may rewrite."""
    shutil.copytree(
        Path(lorm_ext.__file__).parent,
        tmp_path / "lorm_ext",
        ignore=shutil.ignore_patterns("__pycache__", "weights", "_build_info.py"),
    )
    return tmp_path


# Without the finders of editable installs, which would find an installed lorm_ext._C that the copy lacks.
_ONLY_THE_COPY = "import sys\nsys.meta_path = [f for f in sys.meta_path if '__editable__' not in f.__module__]\n"


def _import_copy(root: Path, code: str = "import lorm_ext") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _ONLY_THE_COPY + code],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"PYTHONPATH": str(root)},
        cwd=root,
    )


def test_a_library_built_against_another_torch_is_refused_at_import_with_the_rebuild_command(package_copy):
    (package_copy / "lorm_ext" / _install.BUILD_INFO).write_text(_install.build_info_text("2.13.0+cpu"))
    result = _import_copy(package_copy)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"ImportError: lorm_ext._C was built against torch 2.13.0+cpu, but this environment has torch "
        f"{torch.__version__}. "
    ), last
    assert ADVICE in last


def test_a_library_built_against_this_torch_imports(package_copy):
    (package_copy / "lorm_ext" / _install.BUILD_INFO).write_text(_install.build_info_text(torch.__version__))
    result = _import_copy(package_copy, "import lorm_ext; print(lorm_ext.ops.__file__, lorm_ext._C.__file__)")
    assert result.returncode == 0, result.stderr
    assert all(path.startswith(str(package_copy)) for path in result.stdout.split())


def test_a_missing_library_says_how_to_build_it(package_copy):
    for library in (package_copy / "lorm_ext").glob("_C*.so"):
        library.unlink()
    last = _import_copy(package_copy).stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: lorm_ext._C is not built. ") and ADVICE in last, last


def test_a_library_that_cannot_find_torchs_libraries_says_how_to_rebuild(package_copy):
    # The loader's own failure: the library loaded while no torch has loaded libc10 (a stand-in module named
    # torch, as an environment whose torch is not the one the library links against).
    code = f"""
        import sys, types
        sys.modules["torch"] = types.SimpleNamespace(__version__={torch.__version__!r})
        package = types.ModuleType("lorm_ext"); package.__path__ = [{str(package_copy / "lorm_ext")!r}]
        sys.modules["lorm_ext"] = package
        from lorm_ext._install import load_extension
        load_extension()
    """
    last = _import_copy(package_copy, textwrap.dedent(code)).stderr.strip().splitlines()[-1]
    assert last.startswith(f"ImportError: lorm_ext._C does not load with torch {torch.__version__} ("), last
    assert "libc10" in last and ADVICE in last, last


def test_isolated_build_against_another_torch_is_refused_before_compiling(tmp_path):
    # pip's isolated build puts its build environment in front through PYTHONPATH, as this folder does with a
    # torch whose version differs from the installed one (metadata only: setup.py must stop before importing it).
    fake = tmp_path / "torch-2.13.0+cpu.dist-info"
    fake.mkdir()
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.13.0+cpu\n")
    env = os.environ | {"PYTHONPATH": str(tmp_path), "PYTHONNOUSERSITE": "1"}
    result = subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    line = result.stderr.strip()
    installed = importlib.metadata.version("torch")
    assert line.startswith(
        f"lorm_ext: this build would compile against torch 2.13.0+cpu, but the environment it installs into "
        f"({sys.executable}) has torch {installed}. "
    ), line
    assert ADVICE in line and "\n" not in line


def test_a_build_against_the_installed_torch_goes_ahead():
    result = subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "lorm_ext"


def test_installed_torch_version_ignores_what_pythonpath_puts_in_front(tmp_path, monkeypatch):
    fake = tmp_path / "torch-0.1.dist-info"
    fake.mkdir()
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 0.1\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert _install.installed_torch_version() == importlib.metadata.version("torch")


def test_a_target_environment_without_torch_has_nothing_to_compare(tmp_path):
    import venv

    venv.create(tmp_path / "bare", with_pip=False)  # an environment without torch: the build goes ahead
    python = str(tmp_path / "bare" / "bin" / "python")
    assert _install.installed_torch_version(python) is None
    _install.check_build_torch(python)


def test_build_ext_records_the_torch_beside_the_library_in_the_build_and_the_sources(tmp_path):
    # A tiny extension (no torch headers: seconds to compile) built by the command setup.py uses.
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "ext.cpp").write_text(
        textwrap.dedent("""
        #include <Python.h>
        static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
        PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module); }
    """)
    )
    (tmp_path / "setup.py").write_text(
        textwrap.dedent(f"""
        import importlib.util
        from setuptools import Extension, setup
        spec = importlib.util.spec_from_file_location("install", {str(ROOT / "lorm_ext" / "_install.py")!r})
        install = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(install)
        setup(name="pkg", packages=["pkg"], ext_modules=[Extension("pkg._C", ["pkg/ext.cpp"])],
              cmdclass={{"build_ext": install.build_ext_command()}})
    """)
    )
    build = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace", "--build-lib", "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr
    expected = _install.build_info_text(torch.__version__)
    for folder in (tmp_path / "pkg", tmp_path / "out" / "pkg"):
        assert list(folder.glob("_C*.so")), folder
        assert (folder / _install.BUILD_INFO).read_text() == expected


def test_a_missing_module_of_lorm_ext_itself_is_a_bug_not_a_missing_extra():
    with pytest.raises(ModuleNotFoundError), _install.needs_extra("fcil", "lorm-fcil"):  # not a MissingExtra
        import lorm_ext.no_such_module  # noqa: F401
    with pytest.raises(_install.MissingExtra, match=r"^lorm-fcil needs no_such_dependency, which is not installed"):
        with _install.needs_extra("fcil", "lorm-fcil"):
            import no_such_dependency  # noqa: F401
