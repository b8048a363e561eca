"""The math apart from the runtime (docs/design.md section 1): the modules that compute import neither
the module that places work (`runtime`) nor the loops that call them (`train`, `multi`, `api`)."""

import pathlib
import subprocess
import sys

MATH = ("encoders", "winograd", "positional", "flow", "flow_speed", "model", "train_step", "anomaly_map",
        "metrics")
ABOVE = ("runtime", "train", "multi", "api", "export", "checkpoint")

# The package's __init__ imports the API; a stand-in package lets each math module import alone.
PROBE = """
import importlib, pathlib, sys, types
package = types.ModuleType("cflow_jax")
package.__path__ = [str(pathlib.Path(sys.argv[1]))]
sys.modules["cflow_jax"] = package
for name in sys.argv[2].split(","):
  importlib.import_module("cflow_jax." + name)
print(",".join(sorted(m.split(".", 1)[1] for m in sys.modules if m.startswith("cflow_jax."))))
"""


def test_math_modules_import_nothing_above_them():
  package = pathlib.Path(__file__).parent.parent / "cflow_jax"
  out = subprocess.run([sys.executable, "-c", PROBE, str(package), ",".join(MATH)], check=True,
                       capture_output=True, text=True).stdout
  imported = set(out.strip().split(","))
  assert set(MATH) <= imported  # the probe really imported them
  assert not imported & set(ABOVE), sorted(imported & set(ABOVE))
