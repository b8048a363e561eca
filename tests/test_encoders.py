"""The encoders reproduce the PyTorch references' features at every tap, in float32 and bfloat16.

References come from tests/fixtures/make_encoder_fixtures.py (torchvision ResNets with seeded random weights
and batch-norm statistics; timm's vgg16 with the real HED weights), run once with torch.
"""

import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cflow_jax import encoders, weights
from cflow_jax.errors import UserError

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TOLERANCE = 1e-4  # max|a - b| / max|b|


def load_generator():
  """The fixture generator's module (it imports torch only inside main), for its random weights."""
  spec = importlib.util.spec_from_file_location("make_encoder_fixtures", FIXTURES / "make_encoder_fixtures.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def reference():
  return np.load(FIXTURES / "encoders_reference.npz")


def relative_error(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def run(name, padding, variables, images, dtype=jnp.float32):
  return jitted_extract(name, padding, dtype)(variables, images)


@functools.lru_cache(maxsize=None)
def jitted_extract(name, padding, dtype):
  module, spec = encoders.create_encoder(name, padding, dtype)
  return jax.jit(functools.partial(encoders.extract, module, spec))


@functools.lru_cache(maxsize=None)
def seeded_variables(name):
  """The generator's random torchvision weights, brought in through the state-dict mapping."""
  shapes = weights.expected_state_dict_shapes(name)
  return weights.state_dict_to_variables(name, load_generator().random_state_dict(shapes))


@pytest.mark.parametrize("name,padding", [("resnet18", "zeros"), ("resnet18", "reflect"),
                                          pytest.param("wide_resnet50_2", "zeros", marks=pytest.mark.slow)])
def test_resnet_matches_torchvision(reference, name, padding):
  features = run(name, padding, seeded_variables(name), reference[f"{name}/images"])
  assert len(features) == 3
  for i, f in enumerate(features):
    expected = reference[f"{name}/{padding}/{i}"]
    assert f.dtype == jnp.float32 and f.shape == expected.shape
    assert relative_error(f, expected) < TOLERANCE, f"{name} {padding} tap {i}"


def test_vgg16_hed_matches_timm_with_hed_weights(reference):
  try:
    variables = weights.load_encoder_variables("vgg16_hed")
  except UserError as e:
    pytest.skip(f"HED weights not installed: {e}")
  for i, f in enumerate(run("vgg16_hed", "zeros", variables, reference["vgg16_hed/images"])):
    expected = reference[f"vgg16_hed/zeros/{i}"]
    assert f.shape == expected.shape
    assert relative_error(f, expected) < TOLERANCE, f"vgg16_hed tap {i}"


def test_padding_modes_differ(reference):
  # Guards the reflect test against a padding option that silently does nothing.
  assert relative_error(reference["resnet18/reflect/0"], reference["resnet18/zeros/0"]) > 1e-2


def test_bfloat16_stays_close_to_float32(reference):
  variables = seeded_variables("resnet18")
  images = reference["resnet18/images"]
  full = run("resnet18", "zeros", variables, images)
  half = run("resnet18", "zeros", variables, images, jnp.bfloat16)
  for f, h in zip(full, half):
    assert h.dtype == jnp.float32
    assert 0 < relative_error(h, f) < 2e-2  # bf16 really ran (8-bit mantissa), and did not drift


@pytest.mark.parametrize("name", list(encoders.SPECS))
def test_tap_shapes_follow_the_spec(name):
  module, spec = encoders.create_encoder(name)
  variables = jax.eval_shape(lambda: encoders.init_variables(module, jax.random.key(0)))
  images = jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.uint8)
  features = jax.eval_shape(functools.partial(encoders.extract, module, spec), variables, images)
  assert [f.shape for f in features] == [(2, 64 // s, 96 // s, c) for s, c in zip(spec.strides, spec.channels)]
  assert len(spec.taps) == len(spec.channels) == len(spec.strides) == 3


def test_init_variables_gives_a_runnable_encoder(reference):
  module, _ = encoders.create_encoder("resnet18")
  variables = encoders.init_variables(module, jax.random.key(0))
  assert jax.tree.structure(variables) == jax.tree.structure(seeded_variables("resnet18"))
  kernel = np.asarray(variables["params"]["layer3_0"]["conv1"]["kernel"])  # He-normal: std sqrt(2 / fan_in)
  np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / (3 * 3 * 128)), rtol=0.05)
  for f in run("resnet18", "zeros", variables, reference["resnet18/images"]):
    assert np.isfinite(np.asarray(f)).all() and np.asarray(f).std() > 0


def test_preprocess_imagenet_and_caffe_conventions():
  pixel = np.array([[[[255, 0, 51]]]], np.uint8)  # RGB
  imagenet = encoders.preprocess(pixel, encoders.SPECS["resnet18"])
  np.testing.assert_allclose(imagenet[0, 0, 0], (np.array([1.0, 0.0, 0.2]) - encoders.IMAGENET_MEAN)
                             / np.array(encoders.IMAGENET_STD), rtol=1e-6)
  from_floats = encoders.preprocess(pixel / 255.0, encoders.SPECS["resnet18"])
  np.testing.assert_allclose(imagenet, from_floats, rtol=1e-6)
  caffe = encoders.preprocess(pixel, encoders.SPECS["vgg16_hed"])  # BGR, 0..255, mean only
  np.testing.assert_allclose(caffe[0, 0, 0], np.array([51.0, 0.0, 255.0]) - encoders.CAFFE_MEAN_BGR, rtol=1e-5)


def test_unknown_choices_are_user_errors_listing_the_options():
  with pytest.raises(UserError, match="resnet18, resnet34, wide_resnet50_2, vgg16_hed"):
    encoders.create_encoder("resnet50")
  with pytest.raises(UserError, match="zeros, reflect"):
    encoders.create_encoder("resnet18", padding="circular")
  with pytest.raises(UserError, match="float32 or bfloat16"):
    encoders.create_encoder("resnet18", dtype=jnp.float16)
