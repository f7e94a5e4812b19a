"""Evaluation of a model and of an index: recall@K both ways, ranks, zero-shot accuracy, reports.
Imports everything below it (``model``, ``ingest``, ``store``, ``ann``, ``search``); never ``build``,
``training`` or the CLI."""
