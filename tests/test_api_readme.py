"""The README's functional-API example runs as written and does what it says."""

import pathlib
import re

import pytest

pytestmark = pytest.mark.slow  # trains, scores and reloads a model end to end

README = pathlib.Path(__file__).parents[1] / "README.md"


def api_example() -> str:
  """The first python code block of the README's "Functional API" section."""
  section = README.read_text().split("## Functional API", 1)[1].split("\n## ", 1)[0]
  match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
  assert match, "README.md: the Functional API section has no python code block"
  return match.group(1)


def test_readme_api_example_runs(tmp_path, monkeypatch, capsys):
  code = api_example()
  for call in ("cf.create(", "cf.fit(", "cf.evaluate(", "cf.score(", "cf.load("):
    assert call in code, f"the README example no longer shows {call}"
  monkeypatch.chdir(tmp_path)  # its workdir, runs/readme, lands here
  namespace = {}
  exec(compile(code, f"{README}:Functional API", "exec"), namespace)
  assert (tmp_path / "runs" / "readme" / "checkpoints").is_dir()
  metrics = namespace["result"].metrics
  assert {"image_auroc", "pixel_auroc", "aupro", "image_f1", "pixel_f1"} <= set(metrics)
  assert "image_auroc" in capsys.readouterr().out  # the example prints its metrics
