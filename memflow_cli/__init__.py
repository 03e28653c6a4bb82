"""memflow: long, consistent video narratives with MemFlow on Wan2.1-T2V-1.3B."""

import time as _time

IMPORTED_AT = _time.perf_counter()  # where the process's clock starts when /proc cannot say (`timing.py`)

__version__ = "0.1.0"
