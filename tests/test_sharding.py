"""Training over 8 (virtual CPU) devices, data-parallel or with the decoders side by side, gives the
single-device parameters; scoring split over the devices gives the single-device scores."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # a subprocess that compiles everything for eight devices

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    import cflow_jax as cf
    from cflow_jax import encoders, model as model_lib, runtime, train
    from cflow_jax.config import Config
    assert jax.device_count() == 8, jax.devices()
    # float32 training: the layouts are compared at float32's tolerances (bfloat16 rounding would turn
    # their float-level differences into larger ones).
    config = Config(backbone="resnet18", image_size=64, coupling_blocks=1, fiber_batch=32, batch_size=8,
                    meta_epochs=1, sub_epochs=1, lr=1e-3, train_dtype="float32")
    model = model_lib.build(config)
    variables = encoders.init_variables(model.encoder, jax.random.key(0), 64)
    images = np.random.default_rng(0).integers(0, 256, (20, 64, 64, 3), dtype=np.uint8)
    # Encoded once, so that every run trains on bitwise the same features (a run that encodes itself
    # would see float-level differences, which Adam makes large on parameters with near-zero gradients).
    features = [jax.device_get(model_lib.encode(model, variables, images[i:i + 8])) for i in (0, 8, 16)]
    batches = lambda epoch: iter(features)  # the last batch, 4 images, is replicated
    run = lambda layout: train.fit(model, variables, batches, 3, progress=False, layout=layout)[0]

    initial = model_lib.init_decoders(model, jax.random.key(config.seed))[0]
    norm = lambda tree: float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree))))
    minus = lambda a, b: jax.tree.map(lambda x, y: np.asarray(x) - np.asarray(y), a, b)
    single = run(runtime.Layout(runtime.data_mesh(jax.devices()[:1])))
    moved = norm(minus(single.params, initial))
    assert moved > 1e-2, moved  # training really changed the parameters

    # Data parallel: the same training up to the order of the gradient sums. Compared by norm: Adam turns
    # float-level differences of near-zero gradients into visible ones on a few weights.
    data_parallel = run(runtime.Layout(runtime.data_mesh()))
    diff = norm(minus(data_parallel.params, single.params)) / moved
    print("data parallel: difference / movement", diff)
    assert diff < 1e-3, diff

    # Side by side: each decoder's steps are the single-device ones, on another device: bitwise equal.
    side_by_side = runtime.train_layout(train.layer_costs(model))
    assert len({d.device_set.pop() for d in side_by_side.decoders}) == 3  # a device per decoder
    state = run(side_by_side)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(single.params)):
      np.testing.assert_array_equal(a, b)
    print("side by side: equal")
    for state in (data_parallel, state):
      w = state.params[0]["w1"]
      assert len(w.sharding.device_set) == 8, w.sharding  # replicated over the mesh for scoring

    detector = cf.api.Detector(model, variables, single.params, single.permutations,
                               train.fit_normalization(model, variables, single.params, single.permutations,
                                                       [images[:8]], runtime.data_mesh(jax.devices()[:1])))
    split = cf.score(detector, images[:8], batch_size=8)  # each of the 8 devices scores one image
    alone = [cf.score(detector, images[i:i + 1], batch_size=1) for i in range(8)]  # 1 image: replicated
    np.testing.assert_allclose(split.scores, np.concatenate([a.scores for a in alone]), rtol=1e-5)
    np.testing.assert_allclose(split.maps, np.concatenate([a.maps for a in alone]), rtol=1e-5, atol=1e-6)
    print("scores split over devices equal scores one image at a time")
    # On the split CPU, log-likelihoods come back on one device: batch maxima are then no collectives
    # waiting on eight independent queues.
    mesh = runtime.data_mesh()
    replicated = runtime.replicate((variables, single.params, single.permutations), mesh)
    assert all(len(lp.sharding.device_set) == 1
               for lp in runtime.batch_log_probs(model, replicated, images[:8], mesh))
""")


def test_training_and_scoring_over_devices_match_a_single_device():
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "side by side: equal" in result.stdout
  assert "scores split over devices" in result.stdout
