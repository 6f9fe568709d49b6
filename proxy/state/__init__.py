"""State shared by proxy replicas: the deduplication store (SPEC §4, §12)."""
