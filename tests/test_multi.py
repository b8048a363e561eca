"""Training several categories at once with vmap gives what training them one by one gives."""

import jax
import numpy as np
import pytest

import cflow_jax as cf
from cflow_jax import encoders, multi

pytestmark = pytest.mark.slow  # four whole training runs

def test_vmapped_categories_match_separate_runs():
  # float32 training: compared at float32's tolerances (bfloat16 would round the two programs' float-level
  # differences into larger ones).
  config = cf.Config(backbone="resnet18", image_size=64, coupling_blocks=2, fiber_batch=64, batch_size=16,
                     meta_epochs=1, sub_epochs=1, rotation=0.0, train_dtype="float32")
  module, _ = encoders.create_encoder("resnet18")
  variables = encoders.init_variables(module, jax.random.key(0), 64)
  sets = {c: cf.data.load("demo", "train", c).subset(range(32)) for c in ("brick", "grass")}  # lockstep
  together = multi.fit_many(config, sets, encoder_variables=variables, progress=False)
  for category, train_set in sets.items():
    alone = cf.fit(config, train_set, encoder_variables=variables, progress=False)
    for a, b in zip(jax.tree.leaves(together[category].params), jax.tree.leaves(alone.params)):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(together[category].normalization.layer_max, alone.normalization.layer_max,
                               rtol=1e-3)
  brick, grass = (together[c].params[0]["w1"] for c in ("brick", "grass"))
  assert float(np.max(np.abs(brick - grass))) > 1e-4  # each category trained on its own images
