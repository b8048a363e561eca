"""Several categories at once (vmapped decoders, shared encoder) against one after another.

    python experiments/bench/multi.py --backbone=vgg16_hed --image_size=128 --epochs=2

Both sides train the same categories for the same epochs; each side runs once untimed first so that
compilation is not counted. Prints training fibers/s of each and the ratio.
"""

import time

from absl import app, flags

import cflow_jax as cf
from cflow_jax import multi

flags.DEFINE_list("categories", ["brick", "grass", "gravel"], "Demo categories to train together.")
flags.DEFINE_string("backbone", "vgg16_hed", "Encoder.")
flags.DEFINE_integer("image_size", 128, "Input size.")
flags.DEFINE_integer("epochs", 2, "Passes over the training images.")
flags.DEFINE_integer("batch_size", 16, "Images per batch.")
FLAGS = flags.FLAGS


def main(_):
  config = cf.Config(backbone=FLAGS.backbone, image_size=FLAGS.image_size, batch_size=FLAGS.batch_size,
                     meta_epochs=FLAGS.epochs, sub_epochs=1, rotation=0.0)
  _, variables = cf.create(config)
  sets = {c: cf.data.load("demo", "train", c).resized(config.image_size) for c in FLAGS.categories}

  def together():
    return multi.fit_many(config, sets, encoder_variables=variables, progress=False)

  def one_by_one():
    return {c: cf.fit(config, s, encoder_variables=variables, progress=False) for c, s in sets.items()}

  seconds = {}
  for name, run in (("one_by_one", one_by_one), ("vmapped", together)):
    run()  # compile
    began = time.perf_counter()
    run()
    seconds[name] = time.perf_counter() - began
  sizes = cf.create(config, variables)[0].feature_sizes()
  fibers = config.epochs * sum((len(s) // config.batch_size) * config.batch_size * sum(h * h for h in sizes)
                               for s in sets.values())
  print(f"{len(sets)} categories, {config.backbone}, {config.image_size} px, {config.epochs} epochs")
  for name, s in seconds.items():
    print(f"  {name:10s} {s:7.1f} s  {fibers / s:10,.0f} fibers/s (training and normalisation)")
  print(f"  vmapped / one_by_one throughput: {seconds['one_by_one'] / seconds['vmapped']:.2f}x")


if __name__ == "__main__":
  app.run(main)
