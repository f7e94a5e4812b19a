"""The index folder on disk: manifest, Parquet shards with one schema per collection, the lock,
integrity checks, and where the model lives. Imports the core modules and ``retrieval.model.spec``."""
