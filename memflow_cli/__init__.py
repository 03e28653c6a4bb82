"""memflow: long, consistent video narratives with MemFlow on Wan2.1-T2V-1.3B."""

__version__ = "0.1.0"
