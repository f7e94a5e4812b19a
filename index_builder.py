"""``python index_builder.py ...``: the ``index`` console script (``retrieval index``) as a file."""

from retrieval.cli import index_main

if __name__ == "__main__":
    index_main()
