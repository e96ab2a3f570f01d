"""StructXLIP training and evaluation library (no Prefect imports)."""

import storage  # noqa: F401 - chooses Arrow's allocator before anything loads pyarrow
