"""hrsa: a distributed streaming activation store and Hierarchical Representation Similarity Analysis.

Subpackages: ``hrsa.store`` (the Zarr activation store), ``hrsa.extract`` (corpora and extraction),
``hrsa.analyze`` (HRSA metrics), ``hrsa.train`` (embedding training), ``hrsa.cluster`` (Ray jobs).
Heavy dependencies load on first use, so ``import hrsa`` and ``hrsa --help`` stay fast.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hrsa")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
