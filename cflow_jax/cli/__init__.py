"""The command line: one module per command (train, predict, benchmark, export), each with the `main` its
console script runs (pyproject.toml: cflow-train, ...; experiments/<command>.py wraps the same `main`).
What they share: `common` (running, reporting, exiting) and `config_flags` (the flags of the Config).
"""
