"""Throughput of training and scoring, with FLOP counts and the fraction of this machine's matmul rate.

    python experiments/bench/speed.py --backbone=vgg16_hed --image_size=256 --batch_size=8
    python experiments/bench/speed.py --backbone=wide_resnet50_2 --random_weights   # speed only

FLOPs: the encoder's from XLA's cost analysis of the compiled function, the decoders' counted from their
matmul shapes (XLA counts a loop's body once, not once per iteration). The reference rate is a square
matmul (--matmul_size) measured in the same process (f32, and bf16 with f32 accumulation). Timings are the best of
--repeats.
"""

import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from cflow_jax.cli import common
from cflow_jax import api, encoders, flow, model as model_lib, precision, runtime, train, train_step
from cflow_jax.anomaly_map import Normalization, anomaly_maps
from cflow_jax.config import Config

flags.DEFINE_string("backbone", "vgg16_hed", "Encoder.")
flags.DEFINE_integer("image_size", 256, "Input size.")
flags.DEFINE_integer("batch_size", 8, "Images per batch.")
flags.DEFINE_integer("fiber_batch", 256, "Fibers per optimiser step (N).")
flags.DEFINE_enum("encoder_dtype", "float32", ["float32", "bfloat16"], "Encoder precision.")
flags.DEFINE_enum("train_dtype", "float32", ["auto", "float32", "bfloat16"], "The flows' matmul inputs in "
                  "training.")
flags.DEFINE_enum("score_dtype", Config.score_dtype, ["auto", "float32", "bfloat16"], "The flows' matmul "
                  "inputs when scoring.")
flags.DEFINE_bool("random_weights", False, "Random encoder weights (speed only; no download needed).")
flags.DEFINE_integer("matmul_size", 4096, "Side of the square matmul whose rate is the reference (an accelerator "
                     "needs a larger one than a CPU to reach its peak).")
flags.DEFINE_integer("repeats", 3, "Timed repetitions (the best is kept).")
flags.DEFINE_string("out", None, "Write the figures to this JSON file.")
flags.DEFINE_integer("cpu_devices", None, "JAX devices to split the CPU into (as in train.py): the decoders "
                     "then train side by side. Default: one per tapped layer, at most one per core.")
FLAGS = flags.FLAGS


def best_time(fn, repeats):
  jax.block_until_ready(fn())  # compile and warm up
  times = []
  for _ in range(repeats):
    began = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - began)
  return min(times)


def flops_of(jitted, *args):
  cost = jitted.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


def matmul_rate(dtype, repeats, n=4096):
  a = jax.random.normal(jax.random.key(0), (n, n)).astype(dtype)
  mm = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
  return 2 * n ** 3 / best_time(lambda: mm(a, a), repeats)


def main(_):
  config = Config(backbone=FLAGS.backbone, image_size=FLAGS.image_size, batch_size=FLAGS.batch_size,
                  fiber_batch=FLAGS.fiber_batch, encoder_dtype=FLAGS.encoder_dtype,
                  train_dtype=FLAGS.train_dtype, score_dtype=FLAGS.score_dtype, rotation=0.0)
  model = model_lib.build(config)
  if FLAGS.random_weights:
    variables = encoders.init_variables(model.encoder, jax.random.key(0), config.image_size)
  else:
    variables = api.create(config)[1]
  b, s = config.batch_size, config.image_size
  images = np.random.default_rng(0).integers(0, 256, (b, s, s, 3), dtype=np.uint8)
  layout = runtime.train_layout(train.layer_costs(model))
  mesh = layout.mesh
  state = train.init_state(model, jax.random.key(0))
  encoder_variables = runtime.replicate(variables, mesh)
  encode = lambda: runtime.encode(model, encoder_variables, layout.put_images(images), mesh=mesh)
  features = encode()
  key_data = train.layer_key_data(jax.random.key(1), len(model.channels))
  fibers = sum(b * h * h for h in model.feature_sizes())
  steps = sum(train_step.chunks_per_batch(b * h * h, config) for h in model.feature_sizes())
  fixed = runtime.beside_log_probs(
      Normalization(jnp.zeros(len(model.channels)), jnp.asarray(len(model.channels), jnp.float32)), mesh)
  replicated = runtime.replicate((variables, state.params, state.permutations), mesh)
  maps = jax.jit(anomaly_maps, static_argnums=(1, 3))
  score = lambda: maps(runtime.batch_log_probs(model, replicated, images, mesh), s, fixed, config.blur_sigma)

  # The train step donates its parameters: give it freshly placed copies each call.
  fresh = lambda: runtime.place_state(jax.tree.map(jnp.copy, state), layout)
  train_call = lambda: train.train_batch(model, layout, fresh().decoders, features, key_data,
                                         np.float32(config.lr))

  stream = lambda: common.streamed_seconds(model, layout, fresh().decoders, encode, key_data, config.lr,
                                           FLAGS.repeats)
  figures = {
      "backbone": config.backbone, "image_size": s, "batch_size": b, "fiber_batch": config.fiber_batch,
      "encoder_dtype": config.encoder_dtype,
      "train_dtype": config.train_dtype, "score_dtype": str(precision.matmul_dtype(config.score_dtype)),
      "devices": [str(d) for d in jax.devices()],
      "decoder_devices": (["all, data parallel"] if layout.decoders is None
                          else [str(d.device_set.pop()) for d in layout.decoders]),
      "matmul_size": FLAGS.matmul_size,
      "matmul_f32_gflops": matmul_rate(jnp.float32, FLAGS.repeats, FLAGS.matmul_size) / 1e9,
      "matmul_bf16_gflops": matmul_rate(jnp.bfloat16, FLAGS.repeats, FLAGS.matmul_size) / 1e9,
  }
  copy_seconds = best_time(fresh, FLAGS.repeats)
  encode_seconds = best_time(encode, FLAGS.repeats)
  train_seconds = best_time(train_call, FLAGS.repeats) - copy_seconds
  score_seconds = best_time(score, FLAGS.repeats)
  stream()  # compiled already; a first pass to settle the allocator
  stream_seconds = stream()
  # The encoder's own function on the whole batch: on one CPU `model_lib.encode` loops over the images, and
  # XLA would count the loop's body (one image) once.
  extract = jax.jit(lambda v, x: encoders.extract(model.encoder, model.spec, v, x))
  encode_flops = flops_of(extract, variables, images)
  # Scoring projects each position's condition once per batch (model.layer_log_probs).
  decoder_flops = sum(b * h * h * flow.forward_flops(c, config.condition_dim, config.coupling_blocks, b)
                      for h, c in zip(model.feature_sizes(), model.channels))
  # The fibers actually trained (the remainder is dropped).
  train_flops = sum(train_step.chunks_per_batch(b * h * h, config) * min(config.fiber_batch, b * h * h)
                    * flow.train_flops(c, config.condition_dim, config.coupling_blocks)
                    for h, c in zip(model.feature_sizes(), model.channels))
  score_flops = encode_flops + decoder_flops
  figures.update({
      "fibers_per_batch": fibers, "optimizer_steps_per_batch": steps,
      "encoder_images_per_s": b / encode_seconds,
      "train_fibers_per_s": fibers / train_seconds,
      "train_ms_per_step": 1e3 * train_seconds / steps,  # over the three layers' optimiser steps
      "train_images_per_s": b / (train_seconds + encode_seconds),
      "train_images_per_s_streamed": b / stream_seconds,
      "score_images_per_s": b / score_seconds,
      "train_step_gflop_per_fiber": train_flops / fibers / 1e9,
      "score_gflop_per_image": score_flops / b / 1e9,
      "encoder_gflop_per_image": encode_flops / b / 1e9,
      "train_gflops_achieved": train_flops / train_seconds / 1e9,
      "score_gflops_achieved": score_flops / score_seconds / 1e9,
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  })
  peak = figures["matmul_bf16_gflops" if config.encoder_dtype == "bfloat16" else "matmul_f32_gflops"]
  figures["train_fraction_of_f32_matmul"] = figures["train_gflops_achieved"] / figures["matmul_f32_gflops"]
  if config.train_dtype == "bfloat16":
    figures["train_fraction_of_bf16_matmul"] = (figures["train_gflops_achieved"]
                                                / figures["matmul_bf16_gflops"])
  figures["score_fraction_of_matmul"] = figures["score_gflops_achieved"] / peak
  for k, v in figures.items():
    print(f"{k:32s} {v:,.4g}" if isinstance(v, float) else f"{k:32s} {v}")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(figures, f, indent=2)


if __name__ == "__main__":
  app.run(lambda argv: main(common.split_cpu(FLAGS.cpu_devices)))
