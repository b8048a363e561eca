"""Images per second of the input pipeline alone (decode, resize, rotate, batch), no model.

Compare with the encoder's images/s: if the pipeline is slower, the device waits for data.

  python experiments/bench/pipeline.py --dataset demo --category brick --image_size 256
  python experiments/bench/pipeline.py --dataset magnetic_tile --data_dir ../shared/data/magnetic_tile
"""

import argparse
import time

from cflow_jax import data


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dataset", default="demo", choices=data.DATASETS)
  parser.add_argument("--category", default=None)
  parser.add_argument("--data_dir", default=None, help="raw data (see cflow_jax/data/datasets.py)")
  parser.add_argument("--tfds_dir", default=None, help="prepared datasets (default $TFDS_DATA_DIR or "
                                                       "~/tensorflow_datasets)")
  parser.add_argument("--split", default="train", choices=("train", "test"))
  parser.add_argument("--image_size", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--rotation", type=float, default=5.0, help="degrees; 0 disables")
  parser.add_argument("--workers", type=int, default=None, help="decode/resize threads (default: CPUs, <= 8)")
  parser.add_argument("--prefetch", type=int, default=2)
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--resized", action="store_true", help="decode and resize once, in memory (timed apart)")
  args = parser.parse_args()
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
  main()
