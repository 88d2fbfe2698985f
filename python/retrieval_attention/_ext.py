"""Loads the compiled extension `retrieval_attention._C` (registers the torch ops as a side effect)."""
import torch  # noqa: F401  (the extension links against libtorch; torch must be loaded first)

try:
    from . import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - only when the package was not built
    raise ImportError(
        "retrieval_attention's C++ extension is not built. Install the package with "
        "`pip install --no-build-isolation -e .` (or `pip install .`) from the repository root."
    ) from exc

HAS_CUDA_KERNELS = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "retrieval_attention::dense_attention", "CUDA"
)
