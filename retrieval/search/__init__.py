"""``Retriever``: searching an index folder by text, image, vector or id. Imports the core
modules, ``model``, ``ingest``, ``store`` and ``ann``; never ``build``, ``evaluation`` or the CLI."""
