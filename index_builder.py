"""The ``index`` console script: ``retrieval index`` as a command of its own."""

from retrieval.cli import exit_promptly, index_app


def main() -> None:
    exit_promptly(index_app)


if __name__ == "__main__":
    main()
