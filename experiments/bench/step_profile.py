"""Where a training step's time goes: one decoder's chunk loop, profiled op by op on one CPU core.

    python experiments/bench/step_profile.py --layer=1 --images=8

Runs `train.make_train_layer` for one tapped layer of vgg16_hed on random features (N = --fiber_batch),
on one JAX device pinned to one core (--cores), traces one whole call with `jax.profiler` and sums the
time of XLA:CPU's operations ("thunks") by kind: matmuls (`dot`, and `ynn_fusion`, the YNNPACK kernels
XLA hands its matmuls with their fused bias and activation), `multiply_add_fusion` (elementwise loops,
mostly the weight updates: Adam makes three passes over every weight, a plain step one), and the rest.
`--noadam` replaces Adam by a plain gradient step, to see its share. A 4096^2 matmul timed on the same
core gives the peak that the step's rate is a fraction of.
"""

import collections
import gzip
import json
import os
import pathlib
import tempfile
import time

from absl import app, flags, logging

flags.DEFINE_integer("layer", 1, "Tapped layer (0: the shallowest).")
flags.DEFINE_integer("images", 8, "Images of features per call (the chunk loop's length).")
flags.DEFINE_integer("image_size", 256, "Input size, which sets the feature maps' size.")
flags.DEFINE_integer("fiber_batch", 64, "Fibers per optimiser step (N).")
flags.DEFINE_integer("cores", 1, "CPU cores to run on (the first ones this process may use).")
flags.DEFINE_bool("adam", True, "Adam, as training runs; --noadam: a plain gradient step.")
flags.DEFINE_integer("top", 12, "Kinds of operation to list.")
FLAGS = flags.FLAGS


def main(_):
  logging.set_verbosity(logging.WARNING)
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:FLAGS.cores])  # before JAX starts its threads
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from cflow_jax import flow, model as model_lib, train, train_step
  from cflow_jax.config import Config

  if not FLAGS.adam:
    train_step.make_optimizer = optax.identity
  config = Config(backbone="vgg16_hed", image_size=FLAGS.image_size, fiber_batch=FLAGS.fiber_batch,
                  rotation=0.0)
  model = model_lib.build(config)
  state = train.init_state(model, jax.random.key(0))
  layer = FLAGS.layer
  size, channels = model.feature_sizes()[layer], model.channels[layer]
  features = jax.random.normal(jax.random.key(1), (FLAGS.images, size, size, channels))
  step = train.make_train_layer(model)
  key_data = train.layer_key_data(jax.random.key(2), len(model.channels))[layer]
  steps = train_step.chunks_per_batch(FLAGS.images * size * size, config)

  def call():
    decoder = jax.tree.map(jnp.copy, state.decoders[layer])
    out = step(decoder, features, key_data, np.float32(1e-4), np.int32(FLAGS.images))
    return jax.block_until_ready(out)

  call()
  times = []
  for _ in range(3):
    began = time.perf_counter()
    call()
    times.append(time.perf_counter() - began)
  seconds = min(times)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      call()
    trace = json.load(gzip.open(next(pathlib.Path(trace_dir).rglob("*.json.gz"))))
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  by_kind, count = collections.Counter(), collections.Counter()
  for e in events:
    name = e.get("name", "")
    if e.get("ph") != "X" or name.startswith(("$", "Thunk", "Pjit", "end:", "Common")) or name == "while":
      continue
    kind = name.rsplit(".", 1)[0]
    by_kind[kind] += e["dur"] * 1e-6
    count[kind] += 1
  total = sum(by_kind.values())

  a = jax.random.normal(jax.random.key(3), (4096, 4096))
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  began = time.perf_counter()
  matmul(a).block_until_ready()
  peak = 2 * 4096 ** 3 / (time.perf_counter() - began) / 1e9

  gflop = FLAGS.fiber_batch * flow.train_flops(channels, config.condition_dim, config.coupling_blocks) / 1e9
  rate = gflop * steps / seconds
  print(f"layer {layer} ({size}x{size}x{channels}), N = {FLAGS.fiber_batch}, {FLAGS.cores} core(s), "
        f"{'Adam' if FLAGS.adam else 'plain gradient steps'}: {steps} steps, {1e3 * seconds / steps:.2f} "
        f"ms/step, {rate:.1f} GFLOP/s = {rate / peak:.2f} of a 4096^2 matmul's {peak:.1f}")
  matmuls = sum(t for k, t in by_kind.items() if k in ("dot", "ynn_fusion"))
  print(f"matmuls run at {gflop * steps / matmuls:.1f} GFLOP/s while they run "
        f"({matmuls / total:.0%} of the traced operations' time)")
  print(f"\n{'operation kind':<28}{'share':>7}{'ms/step':>9}{'per step':>9}")
  for kind, t in by_kind.most_common(FLAGS.top):
    print(f"{kind:<28}{t / total:7.1%}{1e3 * t / steps:9.2f}{count[kind] / steps:9.0f}")


if __name__ == "__main__":
  app.run(main)
