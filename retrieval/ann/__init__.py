"""Nearest-neighbour search over a store's vectors: exact block scans and FAISS indexes (flat,
IVF, HNSW, IVF-PQ) planned within a memory budget and tuned to a recall target. Imports the core
modules and ``retrieval.store``."""
