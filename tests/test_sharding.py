"""Data-parallel training over 8 (virtual CPU) devices gives the single-device parameters."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from cflow_jax import encoders, model as model_lib, sharding, train
    from cflow_jax.config import Config
    assert jax.device_count() == 8, jax.devices()
    config = Config(backbone="resnet18", image_size=64, coupling_blocks=2, fiber_batch=32, batch_size=8,
                    meta_epochs=1, sub_epochs=2, lr=1e-3)
    model = model_lib.build(config)
    variables = encoders.init_variables(model.encoder, jax.random.key(0), 64)
    images = np.random.default_rng(0).integers(0, 256, (20, 64, 64, 3), dtype=np.uint8)
    batches = lambda epoch: (images[i:i + 8] for i in (0, 8, 16))  # the last batch, 4 images, is replicated
    run = lambda mesh: train.fit(model, variables, batches, 3, progress=False, mesh=mesh)[0]
    single = run(sharding.data_mesh(jax.devices()[:1]))
    sharded = run(sharding.data_mesh())
    w = sharded.params[0]["w1"]
    assert len(w.sharding.device_set) == 8, w.sharding  # replicated over the mesh
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / (np.max(np.abs(np.asarray(b))) + 1e-12))
               for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params)))
    moved = float(np.max(np.abs(np.asarray(single.params[0]["w1"]) - np.asarray(
        model_lib.init_decoders(model, jax.random.key(config.seed))[0][0]["w1"]))))
    print("max relative difference", diff, "moved", moved)
    assert moved > 1e-4, moved  # training really changed the parameters
    assert diff < 1e-4, diff
""")


def test_sharded_training_matches_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "max relative difference" in result.stdout
