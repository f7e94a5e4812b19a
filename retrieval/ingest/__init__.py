"""Inputs: image folders walked safely, caption and pairs files read row by row, images decoded
in worker processes (and, on a CUDA host, JPEGs decoded on the GPU). Imports the core modules and
``retrieval.model`` (its preprocessing)."""
