"""Datasets for anomaly detection, prepared with tensorflow-datasets (no TensorFlow) and fed as numpy.

  images = data.load("demo", "train", "brick")           # an ImageSet: len(), images[i] -> example dict
  for batch in data.batches(images, 32, 256, seed=0, epoch=e, rotation=5.0): ...

See `datasets.py` for where raw and prepared data live, `input_pipeline.py` for what a batch holds.
"""

from cflow_jax.data.datasets import CATEGORIES, DATASETS, ImageSet, load
from cflow_jax.data.input_pipeline import batches

__all__ = ["CATEGORIES", "DATASETS", "ImageSet", "batches", "load"]
