"""Direction reconstruction models: the GraphNeT DynEdge baseline, the three winning Kaggle
solutions (``edgeconv_transformer`` 1st, ``icemix`` 2nd, ``gpt_boost`` 3rd) and the line-fit
reference, behind one registry (:mod:`icegrid.models.registry`)."""

from icegrid.models.registry import (ALIASES, MODEL_NAMES, CheckpointError, LoadedModel, build, canonical,
                                     default_checkpoint, expand, load_checkpoint)

__all__ = ["ALIASES", "MODEL_NAMES", "CheckpointError", "LoadedModel", "build", "canonical",
           "default_checkpoint", "expand", "load_checkpoint"]
