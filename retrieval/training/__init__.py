"""Training: contrastive fine-tuning that writes and resumes checkpoints in the seed's format.
Imports the core modules, ``model`` and ``ingest``; never the index layers or the CLI."""
