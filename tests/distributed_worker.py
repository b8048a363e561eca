"""One process of a multi-process JAX job on this machine (tests/test_distributed.py starts several):
joins the job over the loopback interface, trains the tiny demo run, and saves what it ended with.

  python tests/distributed_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR OUT.npz [EPOCHS]

WORKDIR "-" trains without checkpoints. What the run logs (e.g. that it resumed) is printed.
"""

import json
import sys

import jax

process_id, num_processes, port, workdir, out = sys.argv[1:6]
epochs = int(sys.argv[6]) if len(sys.argv) > 6 else 1
process_id, num_processes = int(process_id), int(num_processes)
jax.config.update("jax_cpu_collectives_implementation", "gloo")  # collectives between CPU processes
jax.config.update("jax_num_cpu_devices", 1)
if num_processes > 1:
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id, initialization_timeout=120)

import numpy as np  # noqa: E402

import cflow_jax as cf  # noqa: E402
from cflow_jax import encoders  # noqa: E402

# Which rows of each image batch this process hands to JAX: its own slice, `runtime.shard_batch`.
reads = []
make_array = jax.make_array_from_process_local_data


def recording(sharding, local, global_shape=None):
  reads.append([int(local.shape[0]), int(global_shape[0])])
  return make_array(sharding, local, global_shape)


jax.make_array_from_process_local_data = recording

# Tiny: 16 images in two batches of 8 (which divide over 1, 2 and 4 devices), one coupling block.
# float32 training: one process and two are compared at float32's tolerance (test_distributed.TOLERANCE).
CONFIG = cf.Config(backbone="resnet18", image_size=64, coupling_blocks=1, fiber_batch=64, batch_size=8,
                   meta_epochs=epochs, sub_epochs=1, rotation=0.0, train_dtype="float32")
module, _ = encoders.create_encoder(CONFIG.backbone)
variables = encoders.init_variables(module, jax.random.key(0), CONFIG.image_size)
demo = cf.data.load("demo", "train", "brick")
train_set = [demo[i] for i in range(16)]
detector = cf.fit(CONFIG, train_set, encoder_variables=variables, workdir=workdir if workdir != "-" else None,
                  progress=False, log=print)
leaves = {f"param{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(detector.params))}
np.savez(out, layer_max=np.asarray(detector.normalization.layer_max), **leaves,
         reads=np.asarray(reads if reads else np.zeros((0, 2)), np.int64))
print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                  "devices": jax.device_count()}))
