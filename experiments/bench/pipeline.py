"""Images per second of the input pipeline alone (decode, resize, rotate, batch), no model.

Compare with the encoder's images/s: if the pipeline is slower, the device waits for data.

  python experiments/bench/pipeline.py --dataset demo --category brick --image_size 256
  python experiments/bench/pipeline.py --dataset magnetic_tile --data_dir ../shared/data/magnetic_tile
"""

import time

from absl import app, flags

from cflow_jax import data

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "demo", data.DATASETS, "Dataset.")
flags.DEFINE_string("category", None, "Category. Default: the dataset's first.")
flags.DEFINE_string("data_dir", None, "Raw data (see cflow_jax/data/datasets.py).")
flags.DEFINE_string("tfds_dir", None, "Prepared datasets. Default: $TFDS_DATA_DIR or ~/tensorflow_datasets.")
flags.DEFINE_enum("split", "train", ("train", "test"), "Split.")
flags.DEFINE_integer("image_size", 256, "Square size in pixels.")
flags.DEFINE_integer("batch_size", 32, "Images per batch.")
flags.DEFINE_float("rotation", 5.0, "Degrees; 0 disables.")
flags.DEFINE_integer("workers", None, "Decode/resize threads. Default: CPUs, at most 8.")
flags.DEFINE_integer("prefetch", 2, "Batches prepared ahead.")
flags.DEFINE_integer("epochs", 3, "Passes timed.")
flags.DEFINE_bool("resized", False, "Decode and resize once, in memory (timed apart).")


def main(_):
  args = FLAGS
  category = args.category or (data.CATEGORIES[args.dataset] or (None,))[0]

  start = time.perf_counter()
  images = data.load(args.dataset, args.split, category, args.data_dir, tfds_dir=args.tfds_dir)
  print(f"{images}: loaded (prepared if need be) in {time.perf_counter() - start:.1f} s")
  if args.resized:
    start = time.perf_counter()
    images = images.resized(args.image_size, workers=args.workers)
    print(f"decoded and resized to {args.image_size} px once in {time.perf_counter() - start:.2f} s")
  for epoch in range(args.epochs):
    start, count = time.perf_counter(), 0
    for batch in data.batches(images, args.batch_size, args.image_size, seed=0, epoch=epoch,
                              rotation=args.rotation, prefetch=args.prefetch, workers=args.workers):
      count += len(batch["label"])
    seconds = time.perf_counter() - start
    print(f"epoch {epoch}: {count} images at {args.image_size} px in {seconds:.2f} s = "
          f"{count / seconds:.0f} images/s")


if __name__ == "__main__":
  app.run(main)
