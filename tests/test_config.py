"""The Config's own checks: what a flag or a caller can get wrong is refused when the Config is made."""

import dataclasses
import math

import pytest

from cflow_jax.config import Config

FLOATS = [f.name for f in dataclasses.fields(Config) if f.type in (float, "float")]


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_float_field_must_be_finite(name, value):
  with pytest.raises(ValueError, match=f"{name} must be a finite number, got {value}"):
    Config(**{name: value})


@pytest.mark.parametrize("name, value", [("lr", 0.0), ("lr", -1e-4), ("clamp", 0.0), ("rotation", -5.0),
                                         ("rotation", 181.0), ("blur_sigma", -1.0)])
def test_float_fields_out_of_range_are_refused(name, value):
  with pytest.raises(ValueError, match=f"{name} must be in"):
    Config(**{name: value})


def test_the_edges_of_the_ranges_are_allowed():
  Config(rotation=0.0, blur_sigma=0.0)
  Config(rotation=180.0)
  assert set(FLOATS) >= {"lr", "clamp", "rotation", "blur_sigma"}
