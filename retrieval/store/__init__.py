"""The index folder on disk: a Delta Lake table per collection (one schema each), the catalog of
FAISS indexes, pinned snapshots, vacuum, the lock, integrity checks, the migration of the earlier
format, and where the model lives. Imports the core modules and ``retrieval.model.spec``."""
