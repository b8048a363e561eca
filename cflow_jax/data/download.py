"""Fetching and unpacking a dataset archive, each step at most once and never half-done.

tfds's own download manager is not used: its extractor calls TensorFlow (`tf.io.gfile`), which this project
does not install, and its checksum check also needs the exact byte size, which MVTec does not publish.
Both steps write to a temporary sibling and rename it when complete, so an interrupted run leaves
nothing that a later run mistakes for a finished download.
"""

import hashlib
import lzma
import shutil
import tarfile
import urllib.error
import urllib.request
import uuid
import zipfile
from pathlib import Path

import tqdm

from cflow_jax.errors import UserError

_CHUNK = 1 << 20


def fetch(url: str, dest: Path, sha256: str | None, manual: str) -> Path:
  """Downloads `url` to `dest` unless it is there; checks its SHA-256 when given.

  `manual` tells the user how to get the file by hand if the download fails.
  """
  if dest.is_file():
    return dest
  dest.parent.mkdir(parents=True, exist_ok=True)
  partial = dest.with_name(f"{dest.name}.incomplete-{uuid.uuid4().hex}")
  digest = hashlib.sha256()
  try:
    with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as out:
      size = int(response.headers.get("Content-Length") or 0) or None
      with tqdm.tqdm(total=size, unit="B", unit_scale=True, desc=f"Downloading {dest.name}") as bar:
        while chunk := response.read(_CHUNK):
          digest.update(chunk)
          out.write(chunk)
          bar.update(len(chunk))
    if sha256 is not None and digest.hexdigest() != sha256:
      raise UserError(f"The file downloaded from {url} has SHA-256 {digest.hexdigest()}, expected {sha256}: "
                      f"the download is corrupt or the file has changed. Retry, or {manual}")
    partial.rename(dest)
  except (OSError, urllib.error.URLError) as error:
    raise UserError(f"Could not download {url} ({error}). {manual}") from error
  finally:
    partial.unlink(missing_ok=True)
  return dest


def extract(archive: Path, dest: Path) -> Path:
  """Unpacks a .zip or .tar[.gz|.xz] archive into the folder `dest` unless it is there."""
  if dest.is_dir():
    return dest
  partial = dest.with_name(f"{dest.name}.incomplete-{uuid.uuid4().hex}")
  try:
    if zipfile.is_zipfile(archive):
      with zipfile.ZipFile(archive) as members:
        members.extractall(partial)  # zipfile itself drops absolute paths and ".." from member names
    else:
      with tarfile.open(archive) as members:  # compression detected from the content
        # filter="data" refuses members that would land outside `partial` (absolute paths, "..", links).
        members.extractall(partial, filter="data")
    partial.rename(dest)
  except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile, lzma.LZMAError) as error:
    raise UserError(f"Cannot unpack {archive} ({error}); delete it and run again to fetch it.") from error
  finally:
    shutil.rmtree(partial, ignore_errors=True)
  return dest


def find_root(folder: Path, marker: str) -> Path | None:
  """The folder at or up to two levels below `folder` that contains `marker` (archives add a top folder)."""
  for candidate in (folder, *sorted(folder.glob("*/")), *sorted(folder.glob("*/*/"))):
    if (candidate / marker).exists():
      return candidate
  return None
