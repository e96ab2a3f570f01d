"""Prefect orchestration: thin flows and tasks over ``pipelines`` and ``structxlip`` (imported lazily)."""
