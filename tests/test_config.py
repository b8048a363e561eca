"""The Config: what a flag or a caller can get wrong is refused when it is made; the references' recipes
each set exactly their fields, to the values the references use, and --recipe reaches them from the
command line with the other flags on top."""

import dataclasses
import json
import math
import pathlib
import subprocess
import sys

import pytest

from cflow_jax import checkpoint
from cflow_jax.config import RECIPES, Config

REPO = pathlib.Path(__file__).parents[1]
FLOATS = [f.name for f in dataclasses.fields(Config) if f.type in (float, "float")]


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_float_field_must_be_finite(name, value):
  with pytest.raises(ValueError, match=f"{name} must be a finite number, got {value}"):
    Config(**{name: value})


@pytest.mark.parametrize("name, value", [("lr", 0.0), ("lr", -1e-4), ("clamp", 0.0), ("rotation", -5.0),
                                         ("rotation", 181.0), ("blur_sigma", -1.0), ("warmup", -0.1),
                                         ("warmup", 0.6), ("floor_quantile", -0.01),
                                         ("floor_quantile", 1.5)])
def test_float_fields_out_of_range_are_refused(name, value):
  with pytest.raises(ValueError, match=f"{name} must be in"):
    Config(**{name: value})


def test_the_edges_of_the_ranges_are_allowed():
  Config(rotation=0.0, blur_sigma=0.0)
  Config(rotation=180.0)
  assert set(FLOATS) >= {"lr", "clamp", "rotation", "blur_sigma"}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_recipe_sets_exactly_its_fields(name):
  ours, recipe = Config(), Config.recipe(name)
  for field in dataclasses.fields(Config):
    expected = RECIPES[name].get(field.name, getattr(ours, field.name))
    assert getattr(recipe, field.name) == expected, field.name
  assert Config.recipe(name, lr=3e-4).lr == 3e-4  # fields given on top win


def test_the_recipes_hold_the_references_settings():
  original, anomalib = Config.recipe("original"), Config.recipe("anomalib")
  assert (original.fiber_batch, original.lr, original.schedule, original.meta_epochs, original.sub_epochs,
          original.rotation, original.normalization, original.blur_sigma) == \
      (256, 2e-4, "cosine", 25, 8, 5.0, "test_set", 0.0)
  assert original.likelihood == anomalib.likelihood == "exp"  # exp(log p - max), as both compute maps
  assert original.drop_remainder and original.drop_last_batch
  assert (anomalib.fiber_batch, anomalib.lr, anomalib.schedule, anomalib.rotation, anomalib.resample,
          anomalib.image_dtype, anomalib.normalization, anomalib.blur_sigma) == \
      (64, 1e-4, "constant", 0.0, "bilinear", "float32", "batch", 0.0)
  assert not anomalib.drop_remainder and not anomalib.drop_last_batch
  with pytest.raises(ValueError, match="recipe"):
    Config.recipe("paper")


def test_a_run_saved_before_a_field_existed_keeps_the_value_it_was_trained_with():
  """A run saved before `likelihood` existed holds maxima, not floors: it loads as "exp", while a run that
  saved the field keeps its own, and a field added with no such value takes its default."""
  saved = json.loads(Config(lr=3e-4).to_json())
  old = {k: v for k, v in saved.items() if k not in ("likelihood", "floor_quantile")}
  loaded = checkpoint.config_from_meta({"config": json.dumps({**old, "warmup_epochs": 2})})
  assert (loaded.likelihood, loaded.floor_quantile, loaded.lr) == ("exp", Config().floor_quantile, 3e-4)
  assert checkpoint.config_from_meta({"config": json.dumps(saved)}).likelihood == "floored_log"


def _config_from_flags(*argv) -> dict:
  """The Config the training scripts build from these flags, in a fresh process (absl's flags are global)."""
  code = ("import sys; from absl import flags; from cflow_jax.cli import config_flags; "
          "config_flags.define_training_flags(); flags.FLAGS(['train.py', *sys.argv[1:]]); "
          "print(config_flags.config_from_flags().to_json())")
  result = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  return json.loads(result.stdout)


def test_recipe_flag_starts_from_the_recipe_and_other_flags_override_it():
  got = _config_from_flags("--recipe=anomalib", "--lr=3e-4", "--epochs=1")
  expected = dataclasses.asdict(Config.recipe("anomalib", lr=3e-4, meta_epochs=1, sub_epochs=1))
  assert got == json.loads(json.dumps(expected))
  assert _config_from_flags() == json.loads(Config().to_json())  # no flag: our defaults
