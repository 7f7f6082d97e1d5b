"""icegrid: reprocess IceCube Kaggle-layout neutrino events with the top-3 Kaggle reconstructions on a laptop,
a SLURM cluster or an HTCondor pool, and turn the result into resolution-versus-energy tables and figures."""

__version__ = "0.1.0"
