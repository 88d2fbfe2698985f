"""Packaging: `pip wheel . --no-build-isolation --no-deps` builds a wheel holding the compiled extension and every Python
file of the package, versioned from python/retrieval_attention/_version.py (the one place the version is written), and
the wheel installed on its own imports and runs an op.

The build compiles the extension from scratch in a copy of the source tree (the checkout's build/ is not touched), which
takes about 2 minutes on a 2-core machine: the wheel tests are marked `slow`.
"""
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PKG = ROOT / "python" / "retrieval_attention"

def source_version() -> str:
    m = re.fullmatch(r'__version__ = "([^"]+)"\s*', (PKG / "_version.py").read_text())
    assert m, "_version.py must hold exactly one line: __version__ = \"X.Y.Z\""
    return m.group(1)


def source_files() -> list[str]:
    """Files git tracks plus untracked ones it does not ignore: what a fresh clone (plus local work) holds."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [f for f in out.stdout.splitlines() if f and (ROOT / f).is_file()]


def test_version_is_written_in_one_place():
    version = source_version()
    assert "read_version()" in (ROOT / "setup.py").read_text()
    for name in ("setup.py", "pyproject.toml"):
        text = (ROOT / name).read_text()
        assert version not in text, f"{name} repeats the version {version}; it must come from _version.py only"
    assert not re.search(r"^\s*version\s*=", (ROOT / "pyproject.toml").read_text(), re.M)
    import retrieval_attention

    assert retrieval_attention.__version__ == version


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    for rel in source_files():
        dst = src / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst)
    out_dir = tmp / "wheels"
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 2)))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-build-isolation", "--no-deps", "-w", str(out_dir)],
                          cwd=src, capture_output=True, text=True, timeout=3000, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    wheels = list(out_dir.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0], tmp


@pytest.mark.slow
def test_wheel_contents_and_version(wheel):
    path, _ = wheel
    version = source_version()
    assert path.name.startswith(f"retrieval_attention-{version}-"), path.name
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        assert zf.testzip() is None
        metadata = zf.read(f"retrieval_attention-{version}.dist-info/METADATA").decode()
    assert re.search(rf"^Version: {re.escape(version)}$", metadata, re.M)
    assert re.search(r"^Name: retrieval[-_]attention$", metadata, re.M)
    assert [n for n in names if re.fullmatch(r"retrieval_attention/_C[.\w-]*\.so", n)], names
    expected = {f"retrieval_attention/{p.relative_to(PKG).as_posix()}" for p in PKG.rglob("*.py") if "__pycache__" not in p.parts}
    tracked = {f for f in source_files() if f.startswith("python/retrieval_attention/") and f.endswith(".py")}
    expected &= {"retrieval_attention/" + f[len("python/retrieval_attention/"):] for f in tracked}
    missing = expected - set(names)
    assert not missing, f"Python files missing from the wheel: {sorted(missing)}"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    # only the package (and its metadata) goes into the wheel: no tests, benchmarks or models
    assert all(n.startswith(("retrieval_attention/", f"retrieval_attention-{version}.dist-info/")) for n in names), names


@pytest.mark.slow
def test_wheel_installs_and_runs_on_its_own(wheel):
    path, tmp = wheel
    target = tmp / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    code = (
        "import torch, retrieval_attention as ra\n"
        "q = torch.randn(2, 1, 8); k = torch.randn(1, 5, 8); v = torch.randn(1, 5, 8)\n"
        "out, lse = ra.dense_attention(q, k, v, 0.5)\n"
        "print(ra.__version__, ra.__file__, tuple(out.shape))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(target))  # PYTHONPATH comes before the editable install of the checkout
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[0] == source_version()
    assert pathlib.Path(run.stdout.split()[1]).resolve().is_relative_to(target.resolve()), run.stdout
    assert "(2, 1, 8)" in run.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("readelf") is None, reason="needs Linux and readelf")
def test_extension_loads_the_shared_cxx_runtime():
    """The built extension must use the process's libstdc++.so.6, not a static copy: a private copy of the C++ runtime
    (linked by a toolchain without a shared libstdc++, see setup.py) crashed torch ops while formatting error messages."""
    import retrieval_attention._ext as ext

    dyn = subprocess.run(["readelf", "-d", ext._C.__file__], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dyn)
    assert any(n.startswith("libstdc++.so") for n in needed), needed


def _load_setup_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ra_setup", str(ROOT / "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # its setup() call is guarded by __main__
    return mod


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_static_only_toolchain_links_the_loaded_cxx_runtime(tmp_path, monkeypatch):
    """setup.py's fallback: a compiler that cannot find a shared libstdc++ gets the runtime this process has loaded (the
    one torch uses) as an explicit link argument; a normal compiler gets nothing extra."""
    import torch  # noqa: F401  (loads libstdc++.so.6 as torch does)

    mod = _load_setup_module()
    static_only = tmp_path / "static-only-cxx"
    static_only.write_text("#!/bin/sh\necho libstdc++.so\n")  # what g++ -print-file-name prints when it finds none
    static_only.chmod(0o755)
    monkeypatch.setenv("CXX", str(static_only))
    args = mod.shared_cxx_runtime_link_args()
    assert len(args) == 1 and os.path.isabs(args[0]) and "libstdc++.so" in os.path.basename(args[0]), args
    assert os.path.exists(args[0])

    normal = tmp_path / "normal-cxx"
    normal.write_text(f"#!/bin/sh\necho {args[0]}\n")  # a toolchain that does have the shared runtime
    normal.chmod(0o755)
    monkeypatch.setenv("CXX", str(normal))
    assert mod.shared_cxx_runtime_link_args() == []
