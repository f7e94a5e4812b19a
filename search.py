"""The ``search`` console script: ``retrieval search`` as a command of its own."""

from retrieval.cli import exit_promptly, search_app


def main() -> None:
    exit_promptly(search_app)


if __name__ == "__main__":
    main()
