"""GPU and TPU readiness on a CPU-only machine: `jax.export` lowers the training chunk loop and the scoring
function for CUDA and TPU. Lowering fails on what an accelerator cannot run (a host callback, a CPU-only
custom call), and the programs lowered carry the accelerators' path where the CPU's differs (no Winograd
convolution, no image-by-image or block-by-block loop: `cflow_jax.platforms`).

Only shapes are needed (`jax.eval_shape`): no weights are loaded and nothing is compiled.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

import cflow_jax as cf
from cflow_jax import encoders, model as model_lib, train, train_step
from cflow_jax.config import BACKBONES
from cflow_jax.export import scoring_program

# Processes, whole training runs and lowerings for three platforms: the slow subset (pyproject.toml).
pytestmark = pytest.mark.slow

ACCELERATORS = ("cuda", "tpu")
IMAGE_SIZE = 64  # lowering depends on shapes, not on how large they are
DTYPES = ("float32", "bfloat16")


def config(backbone, dtype):
  return cf.Config(backbone=backbone, image_size=IMAGE_SIZE, batch_size=2, train_dtype=dtype,
                   encoder_dtype=dtype, score_dtype=dtype)


def train_layer_args(model, layer: int):
  """The shapes of the arguments `train.make_train_layer`'s program takes for one layer and one image
  batch: one place to adapt if its signature changes."""
  state = jax.eval_shape(functools.partial(train.init_state, model), jax.random.key(0))
  batch, size = model.config.batch_size, model.feature_sizes()[layer]
  features = jax.ShapeDtypeStruct((batch, size, size, model.channels[layer]), jnp.float32)
  key_data = jax.ShapeDtypeStruct((2,), jnp.uint32)  # `train.layer_key_data`'s row
  lr = jax.ShapeDtypeStruct((train_step.chunks_per_batch(batch * size * size, model.config),), jnp.float32)
  valid_images = jax.ShapeDtypeStruct((), jnp.int32)
  return state.decoders[layer], features, key_data, lr, valid_images


def scoring_weights(model):
  """The shapes of (encoder variables, decoders, permutations, normalisation) the scoring program takes."""
  variables = jax.eval_shape(lambda key: encoders.init_variables(model.encoder, key, IMAGE_SIZE),
                             jax.random.key(0))
  state = jax.eval_shape(functools.partial(train.init_state, model), jax.random.key(0))
  return variables, state.params, state.permutations, tuple(state.normalization)


def count(text: str, op: str) -> int:
  return text.count(f"stablehlo.{op}")


def custom_calls(text: str) -> set:
  """The targets of the program's custom calls (a host callback or a CPU kernel would be one)."""
  return {line.split("custom_call @")[1].split("(")[0] for line in text.splitlines() if "custom_call @" in line}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_training_chunk_loop_lowers_for_cuda_and_tpu(backbone, dtype):
  model = model_lib.build(config(backbone, dtype))
  for layer in range(len(model.channels)):
    step = train.make_train_layer(model)
    exported = jax.export.export(step, platforms=ACCELERATORS)(*train_layer_args(model, layer))
    assert exported.platforms == ACCELERATORS
    text = exported.mlir_module()
    assert count(text, "dot_general") and count(text, "while")  # the flow's matmuls, the chunk loop
    assert not custom_calls(text)
    if dtype == "bfloat16":
      assert "bf16" in text


def encoder_kernels(weights) -> int:
  return sum(1 for path, _ in jax.tree_util.tree_leaves_with_path(weights[0]) if path[-1].key == "kernel")


@pytest.mark.parametrize("backbone", BACKBONES)
def test_scoring_lowers_for_cuda_and_tpu_on_their_own_path(backbone):
  """With the default dtypes (a float32 encoder, the flows' matmuls "auto": bfloat16 on accelerators), each
  accelerator's program convolves with XLA's convolution alone (every kernel of the encoder is one
  convolution) and loops over nothing. One platform at a time: lowered for several at once, a program
  holds a copy of an operation per platform wherever JAX's own lowering rules differ between them
  (convolutions do between CUDA and TPU)."""
  model = model_lib.build(cf.Config(backbone=backbone, image_size=IMAGE_SIZE, batch_size=2))
  weights = scoring_weights(model)
  for platform in ACCELERATORS:
    text = scoring_program(model, weights, (platform,)).mlir_module()
    assert count(text, "convolution") == encoder_kernels(weights), platform
    assert count(text, "while") == 0, platform
    assert "bf16" in text, platform  # score_dtype "auto"
    assert custom_calls(text) <= {"shape_assertion"}, platform  # jax.export's check of the batch size


def test_the_cpu_lowering_of_the_same_function_takes_the_cpu_path():
  """The counterpart of the test above: lowered for the CPU, some convolutions take Winograd's path and
  the program loops over images and blocks of fibers."""
  model = model_lib.build(cf.Config(backbone="resnet18", image_size=IMAGE_SIZE, batch_size=2))
  weights = scoring_weights(model)
  text = scoring_program(model, weights, ("cpu",)).mlir_module()
  assert 0 < count(text, "convolution") < encoder_kernels(weights) and count(text, "while") > 0
