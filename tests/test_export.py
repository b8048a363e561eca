"""Export: a trained detector as one file (`cflow_jax.export`), scored in a fresh process that builds no
Flax module and reads no Config, as `cf.score` scores in process; the file's refusals.

One tiny run (HED's VGG16 from the installed wheel, 64 px, 48 demo images, one epoch) is exported once by
experiments/export.py.
"""

import dataclasses
import json
import pathlib
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
from PIL import Image

import cflow_jax as cf
from cflow_jax.errors import UserError
from cflow_jax.export import FORMAT_VERSION, read_header

# Processes, whole training runs and lowerings for three platforms: the slow subset (pyproject.toml).
pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).parents[1]
CONFIG = cf.Config(backbone="vgg16_hed", image_size=64, coupling_blocks=2, fiber_batch=64, batch_size=8,
                   meta_epochs=1, sub_epochs=1, rotation=0.0)
# Scores and maps from the file against `cf.score` in process, absolute (maps lie within about [0, 3]).
TOLERANCE = 1e-5

# Run in a fresh process: building a Flax encoder or a Config there fails the test.
FRESH_PROCESS = """
import sys
import numpy as np
import cflow_jax as cf
from cflow_jax import config, encoders, model

def forbidden(*args, **kwargs):
  raise AssertionError("the exported file's scorer built a model or read a Config")

model.build = encoders.create_encoder = forbidden
config.Config.__init__ = forbidden
path, images, out = sys.argv[1:]
images = np.load(images)
scorer = cf.load_exported(path)
outputs = {}
for batch_size in (8, 5):  # the run's batch size, and one the export never saw
  outputs[f"scores{batch_size}"], outputs[f"maps{batch_size}"] = scorer.score(images, batch_size)
np.savez(out, **outputs)
"""


def run(script, *args):
  return subprocess.run([sys.executable, str(REPO / "experiments" / script), *map(str, args)], cwd=REPO,
                        capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(detector, workdir, exported file, 13 test images) of the tiny run."""
  workdir = tmp_path_factory.mktemp("run")
  detector = cf.fit(CONFIG, cf.data.load("demo", "train", "brick"), workdir=workdir, progress=False)
  path = workdir / "brick.jaxexport"
  result = run("export.py", f"--workdir={workdir}", f"--out={path}")
  assert result.returncode == 0, result.stderr[-4000:]
  assert str(path) in result.stdout
  test_set = cf.data.load("demo", "test", "brick")
  images = np.stack([image for batch in cf.data.batches(test_set, 8, 64) for image in batch["image"]])[:13]
  return detector, workdir, path, images


def test_exported_file_scores_as_in_process_in_a_fresh_process_at_any_batch_size(exported, tmp_path):
  detector, _, path, images = exported
  np.save(tmp_path / "images.npy", images)
  result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(path), str(tmp_path / "images.npy"),
                           str(tmp_path / "out.npz")], cwd=REPO, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  expected = cf.score(detector, images)  # the detector's own settings: score_dtype "auto", batches of 8
  out = np.load(tmp_path / "out.npz")
  for batch_size in (8, 5):
    np.testing.assert_allclose(out[f"scores{batch_size}"], expected.scores, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(out[f"maps{batch_size}"], expected.maps, rtol=0, atol=TOLERANCE)
  assert np.ptp(expected.scores) > 100 * TOLERANCE  # images that score differently: a real comparison


def test_file_holds_one_program_for_cpu_cuda_and_tpu_with_a_symbolic_batch(exported):
  _, workdir, path, _ = exported
  header = read_header(path)
  assert header["platforms"] == ["cpu", "cuda", "tpu"]
  assert header["image_size"] == 64 and header["format_version"] == FORMAT_VERSION
  metrics = json.loads((workdir / "metrics.json").read_text()) if (workdir / "metrics.json").exists() else {}
  assert header["image_threshold"] == metrics.get("image_threshold")
  with zipfile.ZipFile(path) as archive:
    program = jax.export.deserialize(bytearray(archive.read("scoring.jaxexport")))
  images = program.in_avals[-1]
  assert not isinstance(images.shape[0], int) and images.shape[1:] == (64, 64, 3)
  assert program.platforms == ("cpu", "cuda", "tpu")


def test_a_newer_format_another_image_size_or_another_file_is_refused_in_one_line(exported, tmp_path):
  _, _, path, images = exported
  newer = tmp_path / "newer.jaxexport"
  with zipfile.ZipFile(path) as source, zipfile.ZipFile(newer, "w") as target:
    for item in source.infolist():
      data = source.read(item)
      if item.filename == "header.json":
        data = json.dumps({**json.loads(data), "format_version": FORMAT_VERSION + 1})
      target.writestr(item, data)
  with pytest.raises(UserError, match="newer") as error:
    cf.load_exported(newer)
  assert "\n" not in str(error.value)
  with pytest.raises(UserError, match="64 px"):
    cf.load_exported(path, image_size=128)
  scorer = cf.load_exported(path)
  with pytest.raises(UserError, match=r"\(N, 64, 64, 3\)"):
    scorer.score(np.zeros((2, 128, 128, 3), np.uint8))
  (tmp_path / "notes.txt").write_text("not an export")
  with pytest.raises(UserError, match="not an exported"):
    cf.load_exported(tmp_path / "notes.txt")


def test_only_fixed_normalisation_is_exported(exported, tmp_path):
  detector, _, _, _ = exported
  per_batch = dataclasses.replace(detector, model=cf.model.build(dataclasses.replace(CONFIG, normalization="batch")))
  with pytest.raises(UserError, match="--normalization=train"):
    cf.export(per_batch, tmp_path / "batch.jaxexport")
  assert not list(tmp_path.iterdir())  # nothing written


def test_predict_scores_with_an_exported_file_as_with_its_run(exported, tmp_path):
  _, workdir, path, images = exported
  for i in range(2):
    Image.fromarray(images[i]).save(tmp_path / f"{i}.png")
  scores = {}
  for source in (f"--workdir={workdir}", f"--exported={path}"):
    out = tmp_path / source.split("=")[0].strip("-")
    result = run("predict.py", source, f"--out_dir={out}", tmp_path / "0.png", tmp_path / "1.png")
    assert result.returncode == 0, result.stderr[-4000:]
    document = json.loads((out / "scores.json").read_text())
    scores[source] = [r["score"] for r in document["images"]]
  np.testing.assert_allclose(*scores.values(), rtol=0, atol=TOLERANCE)
