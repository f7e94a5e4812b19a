"""The ``search`` console script: ``retrieval search`` as a command of its own."""

from retrieval.cli import run, search_app


def main() -> None:
    run(search_app)


if __name__ == "__main__":
    main()
