"""The README's functional-API example runs as written, does what it says, and really trains: its one
epoch at the defaults, the first thing a user tries, cuts the training loss by a stated factor."""

import contextlib
import io
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cflow_jax import runtime, train

pytestmark = pytest.mark.slow  # trains, scores and reloads a model end to end

README = pathlib.Path(__file__).parents[1] / "README.md"


def api_example() -> str:
  """The first python code block of the README's "Functional API" section."""
  section = README.read_text().split("## Functional API", 1)[1].split("\n## ", 1)[0]
  match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
  assert match, "README.md: the Functional API section has no python code block"
  return match.group(1)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
  """(the example's namespace after it ran, what it printed, the folder it ran in)."""
  folder, here, namespace, printed = tmp_path_factory.mktemp("readme"), os.getcwd(), {}, io.StringIO()
  os.chdir(folder)  # its workdir, runs/readme, lands here
  try:
    with contextlib.redirect_stdout(printed):
      exec(compile(api_example(), f"{README}:Functional API", "exec"), namespace)
  finally:
    os.chdir(here)
  return namespace, printed.getvalue(), folder


def test_readme_api_example_runs(example):
  namespace, printed, folder = example
  for call in ("cf.create(", "cf.fit(", "cf.evaluate(", "cf.score(", "cf.load("):
    assert call in api_example(), f"the README example no longer shows {call}"
  assert (folder / "runs" / "readme" / "checkpoints").is_dir()
  metrics = namespace["result"].metrics
  assert {"image_auroc", "pixel_auroc", "aupro", "image_f1", "pixel_f1"} <= set(metrics)
  assert "image_auroc" in printed  # the example prints its metrics


def test_the_examples_one_epoch_at_the_defaults_cuts_the_training_loss_twentyfold(example):
  """After the example's one epoch (the defaults but for size and epochs), the training fibers' loss is at
  most a twentieth of what the initial decoders give on the first tapped map (measured: 43.4 -> 0.81), and
  at most 1 / 1.8 of it on the deeper ones (2.3 -> 0.79, 2.6 -> 1.13), whose losses start near the floor
  of -log sigmoid. N = 64 at a peak of 2e-4 managed 25x, 1.8x and 1.5x; N = 256 with +-5 degree rotations
  3x, 1.3x and 1.2x."""
  namespace = example[0]
  cf, config, detector = namespace["cf"], namespace["config"], namespace["detector"]
  defaults = cf.Config()
  assert all(getattr(config, k) == getattr(defaults, k)
             for k in ("fiber_batch", "lr", "schedule", "rotation", "drop_last_batch", "coupling_blocks"))
  images = next(cf.api.input_batches(config, namespace["train_images"], 12))["image"]
  initial = train.init_state(detector.model, jax.random.key(config.seed))

  mesh = runtime.data_mesh()

  def losses(params):  # through the program the example's scoring compiled (a batch of 12)
    replicated = runtime.replicate((detector.encoder_variables, params, detector.permutations), mesh)
    log_probs = runtime.batch_log_probs(detector.model, replicated, images, mesh)
    return np.array([float(jnp.mean(-jax.nn.log_sigmoid(lp))) for lp in log_probs])  # log p / C per fiber

  before, after = losses(initial.params), losses(detector.params)
  assert after[0] <= before[0] / 20 and np.all(after <= before / 1.8), (before, after)
