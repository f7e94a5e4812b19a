"""``python search.py ...``: the ``search`` console script (``retrieval search``) as a file."""

from retrieval.cli import search_main

if __name__ == "__main__":
    search_main()
