"""cflow-export as a script: python experiments/export.py --workdir=RUN (cflow_jax/cli/export.py)."""

from cflow_jax.cli import export

if __name__ == "__main__":
  export.main()
