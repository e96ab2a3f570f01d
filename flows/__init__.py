"""Prefect orchestration: thin flows and tasks over ``pipelines`` and ``structxlip`` (imported lazily)."""

import storage  # noqa: F401 - chooses Arrow's allocator before anything loads pyarrow
