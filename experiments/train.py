"""cflow-train as a script: python experiments/train.py --category=cable (cflow_jax/cli/train.py)."""

from cflow_jax.cli import train

if __name__ == "__main__":
  train.main()
