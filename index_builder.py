"""The ``index`` console script: ``retrieval index`` as a command of its own."""

from retrieval.cli import index_app, run


def main() -> None:
    run(index_app)


if __name__ == "__main__":
    main()
