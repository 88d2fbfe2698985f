import os
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "models" / "tinyllama-byte-32k"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_dir():
    assert MODEL_DIR.is_dir(), f"bundled model missing at {MODEL_DIR}"
    return str(MODEL_DIR)


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request):
    return request.param


def in_subprocess(test_fn):
    """Run the decorated test in a child pytest process, so a crash (e.g. a segfault in a kernel's error path)
    fails that one test with the signal named instead of killing the whole test run."""
    import functools
    import signal
    import subprocess
    import sys

    if os.environ.get("RA_TEST_CHILD") == "1":
        return test_fn

    @functools.wraps(test_fn)
    def wrapper(*args, **kwargs):
        request_id = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
        env = dict(os.environ, RA_TEST_CHILD="1")
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request_id], env=env,
                              capture_output=True, text=True, timeout=600, cwd=ROOT)
        if proc.returncode < 0:
            pytest.fail(f"{request_id} crashed the process with {signal.Signals(-proc.returncode).name}:\n{proc.stdout[-2000:]}")
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

    return wrapper
