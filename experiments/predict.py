"""cflow-predict as a script: python experiments/predict.py --workdir=RUN IMAGE ... (cflow_jax/cli/predict.py)."""

from cflow_jax.cli import predict

if __name__ == "__main__":
  predict.main()
