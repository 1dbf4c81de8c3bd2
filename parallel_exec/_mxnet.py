"""The one place that imports MXNet, so a missing install fails with advice."""

try:
    import mxnet as mx
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "parallel_exec needs MXNet, which is not installed. For the CPU build: "
        "pip install 'parallel_exec[cpu]' (or pip install mxnet==1.9.1 'numpy<1.24'); "
        "for GPUs install the build for your CUDA, e.g. pip install mxnet-cu112==1.9.1."
    ) from exc

__all__ = ["mx"]
