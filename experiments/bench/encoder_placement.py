"""Where the encoder runs beside side-by-side decoders: on one device, or split over every device.

    python experiments/bench/encoder_placement.py --rounds=2

Random images and HED's architecture with random weights (the speed does not depend on them), batches
streamed as `train.fit` streams them (encode, then every decoder's steps, without waiting), the two
placements alternating within one process. "one": the encoder on the device that the decoders load
least (the placement before the split); "split": each device encodes its share (`train.fit`'s now).
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import SingleDeviceSharding

from cflow_jax.cli import common
from cflow_jax import encoders, model as model_lib, runtime, train
from cflow_jax.config import Config

flags.DEFINE_integer("rounds", 2, "Alternating rounds (each times both placements).")
flags.DEFINE_integer("batches", 2, "Image batches streamed per timing.")
flags.DEFINE_integer("batch_size", 32, "Images per batch.")
flags.DEFINE_integer("image_size", 256, "Input size.")
flags.DEFINE_integer("fiber_batch", 64, "Fibers per optimiser step (N).")
flags.DEFINE_integer("cpu_devices", 2, "JAX devices to split the CPU into.")
FLAGS = flags.FLAGS


def main(_):
  config = Config(backbone="vgg16_hed", image_size=FLAGS.image_size, batch_size=FLAGS.batch_size,
                  fiber_batch=FLAGS.fiber_batch, rotation=0.0)
  model = model_lib.build(config)
  variables = encoders.init_variables(model.encoder, jax.random.key(0), config.image_size)
  s = config.image_size
  images = np.random.default_rng(0).integers(0, 256, (config.batch_size, s, s, 3), dtype=np.uint8)
  costs = train.layer_costs(model)
  layout = runtime.train_layout(costs)
  if layout.decoders is None:
    raise SystemExit("needs decoders side by side: several CPU devices (--cpu_devices)")
  load = {}
  for decoder, cost in zip(layout.decoders, costs):
    load[decoder] = load.get(decoder, 0.0) + cost
  lightest = min(load, key=load.get)
  one = jax.device_put(variables, lightest)
  everywhere = runtime.replicate(variables, layout.mesh)
  encode = {
      "one": lambda: model_lib.encode(model, one, jax.device_put(images, lightest)),
      "split": lambda: runtime.encode(model, everywhere, layout.put_images(images), mesh=layout.mesh),
  }
  state = train.init_state(model, jax.random.key(0))
  key_data = train.layer_key_data(jax.random.key(1), len(model.channels))

  def stream(name, batches):
    placed = runtime.place_state(jax.tree.map(jnp.copy, state), layout).decoders
    return common.streamed_seconds(model, layout, placed, encode[name], key_data, config.lr, batches)

  names = ["one", "split"]
  for name in names:
    stream(name, 1)  # compile
  for r in range(FLAGS.rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      print(f"{name:6s} {stream(name, FLAGS.batches):7.2f} s per batch", flush=True)


if __name__ == "__main__":
  app.run(lambda argv: main(common.split_cpu(FLAGS.cpu_devices)))
