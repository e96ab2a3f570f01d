"""Pure processing steps (``pipelines.steps``) and the engine that plans and runs them (``pipelines.engine``)."""

import storage  # noqa: F401 - chooses Arrow's allocator before anything loads pyarrow
