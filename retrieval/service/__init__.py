"""The HTTP service (``retrieval serve``): a FastAPI app over ``Retriever``, with coalesced queries
and hot swaps. It imports the library (search, model, store); nothing in the library imports it."""
