"""Output-folder layout (``storage.layout``), content addressing (``storage.hashing``), atomic writes
(``storage.atomic``) and Parquet I/O (``storage.parquet``) shared by every stage.

Importing the package, before pyarrow is loaded, chooses Arrow's allocator for this process and the processes it
starts (``ARROW_DEFAULT_MEMORY_POOL``, unless it is set already): jemalloc on Linux, where pyarrow's wheels build it,
else the C library's. pyarrow's own default, mimalloc, asks the kernel for transparent huge pages, and faulting those
in is slow on some machines: a fully cached run of 1,000,000 images took 34-39 s with it (24 s of them in the kernel),
23-25 s with jemalloc (10 s in the kernel), the same as mimalloc with ``MIMALLOC_ALLOW_THP=0`` or the C library's
allocator; jemalloc peaked ~220 MB lower than either. ``flows``, ``pipelines`` and
``structxlip`` import this package first for that.
"""

import os
import sys

if "pyarrow" not in sys.modules:  # Arrow reads the variable once, when its library loads
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc" if sys.platform.startswith("linux") else "system")
