"""Inputs: image folders walked safely, caption and pairs files read row by row, images decoded
in worker processes. Imports the core modules and ``retrieval.model`` (its preprocessing)."""
