"""State shared by proxy replicas: the deduplication store (docs/CONTRACT.md §5, §12)."""
