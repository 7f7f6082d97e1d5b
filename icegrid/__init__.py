"""icegrid: reprocess IceCube Kaggle-layout neutrino events with the top-3 Kaggle reconstructions on a laptop,
a SLURM cluster or an HTCondor pool, and turn the result into resolution-versus-energy tables and figures.

``icegrid.open_store(path)`` opens an event store for reading from Python (:mod:`icegrid.api`); it is
imported on first use, so ``import icegrid`` stays cheap (no zarr, pyarrow or torch).
"""

__version__ = "0.1.0"
__all__ = ["__version__", "open_store"]


def __getattr__(name: str):
    if name == "open_store":
        from icegrid.api import open_store

        return open_store
    raise AttributeError(f"module 'icegrid' has no attribute '{name}'")
