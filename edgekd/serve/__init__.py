"""A local HTTP inference service over a bundle (FastAPI + uvicorn; torch-free): dynamic batching across clients,
a bounded queue, one-line JSON errors for bad uploads, Prometheus metrics, optional bearer token."""

from edgekd.serve.app import create_app, padded_sizes
from edgekd.serve.server import check_port_free, serve
from edgekd.serve.settings import ServeSettings, check_settings

__all__ = ["ServeSettings", "check_port_free", "check_settings", "create_app", "padded_sizes", "serve"]
