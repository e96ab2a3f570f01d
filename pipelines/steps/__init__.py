"""Stage libraries: one module per data step (no prefect)."""
