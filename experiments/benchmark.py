"""cflow-benchmark as a script: python experiments/benchmark.py --categories=bottle,cable (see
cflow_jax/cli/benchmark.py)."""

from cflow_jax.cli import benchmark

if __name__ == "__main__":
  benchmark.main()
