"""cflow_jax: CFLOW-AD (Gudovskiy et al., WACV 2022) in pure JAX.

The functional API (see api.py): `fit` a detector on good images, `score` new ones (image scores and
anomaly maps), `evaluate` a labelled test set, `load` a trained run from its workdir, `export` a detector
to one portable file and `load_exported` it.
"""

from cflow_jax import data
from cflow_jax.api import Detector, Evaluation, Scores, create, evaluate, fit, load, score, score_batches
from cflow_jax.config import Config
from cflow_jax.errors import UserError
# The function shadows its module's name here: `from cflow_jax.export import ...` still reaches the module.
from cflow_jax.export import export, load_exported

__all__ = ["Config", "Detector", "Evaluation", "Scores", "UserError", "create", "data", "evaluate", "export",
           "fit", "load", "load_exported", "score", "score_batches"]
