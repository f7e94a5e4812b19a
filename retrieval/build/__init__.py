"""``index build`` as plan -> execute -> commit, and ``index verify``. Imports the core modules,
``model``, ``ingest``, ``store`` and ``ann``; never ``search``, ``evaluation``, ``training`` or the CLI."""
