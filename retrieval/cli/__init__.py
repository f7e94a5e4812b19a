"""The command line: typer apps that parse, call one library function and format the result.

``retrieval`` holds every command; ``index`` and ``search`` are its two groups as console scripts
of their own. Library errors become one line on stderr and exit code 2 (the traceback only with
``--debug``).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from retrieval.cli import collection, evaluate, index, model, search, serve, train
from retrieval.errors import RetrievalError, RetrievalWarning

__all__ = ["app", "exit_promptly", "index_app", "index_main", "main", "run", "search_app", "search_main"]

EXIT_ERROR = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130


def _group(name: str, help_text: str) -> typer.Typer:
    return typer.Typer(
        name=name,
        help=help_text,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )


app = _group("retrieval", "Multimodal retrieval with a BERT + ViT dual-encoder checkpoint.")
index_app = _group("index", "Build and inspect index folders.")
search_app = _group("search", "Search an index by text, image or vector.")
model_app = _group("model", "Inspect a model checkpoint and its towers.")
app.add_typer(index_app)
app.add_typer(search_app)
app.add_typer(model_app)
Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error.")]


def _accept_debug(debug: Debug = False) -> None:
    """``--debug`` is read by ``run`` before parsing; declaring it here documents and accepts it."""


for _app in (app, index_app, search_app):
    _app.callback()(_accept_debug)


# The command line is this table: command name -> the function that parses it and calls the library.
app.command("version")(model.version)
app.command("classify")(model.classify)
app.command("embed")(model.embed)
app.command("eval")(evaluate.evaluate)
app.command("train")(train.train)
app.command("serve")(serve.serve)
app.command("neighbors")(collection.neighbors)
app.command("duplicates")(collection.duplicates)
model_app.command("info")(model.model_info)
index_app.command("build")(index.index_build)
index_app.command("info")(index.index_info)
index_app.command("verify")(index.index_verify)
index_app.command("vacuum")(index.index_vacuum)
index_app.command("migrate")(index.index_migrate)
search_app.command("text")(search.search_text)
search_app.command("image")(search.search_image)


# -- entry points ------------------------------------------------------------------------------


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """The engine's warnings as one ``warning:`` line; anyone else's as Python prints them."""
    if issubclass(category, RetrievalWarning):
        typer.echo(f"warning: {message}", err=True)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def run(typer_app: typer.Typer, argv: Sequence[str] | None = None) -> None:
    """Run ``typer_app``, turning errors into one line and an exit code (unless ``--debug``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # towers load from local folders only
    if not debug:
        # Read by transformers when (and only if) a command imports it: no import cost here.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # per-tensor loading bars: noise
    warnings.showwarning = _show_warning
    try:
        typer_app(args=args, prog_name=typer_app.info.name, standalone_mode=True)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as e:
        if debug:
            raise
        if isinstance(e, RetrievalError | OSError):
            typer.echo(f"error: {e}", err=True)
            raise SystemExit(EXIT_ERROR) from None
        typer.echo(
            f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", err=True
        )
        raise SystemExit(EXIT_INTERNAL) from None


def main() -> None:
    """Console script ``retrieval``."""
    exit_promptly(app)


def index_main() -> None:
    """Console script ``index`` (``retrieval index``)."""
    exit_promptly(index_app)


def search_main() -> None:
    """Console script ``search`` (``retrieval search``)."""
    exit_promptly(search_app)


def exit_promptly(typer_app: typer.Typer) -> None:
    """Run a console script, then leave at once with its exit code once the output is flushed.

    Tearing down torch, transformers and FAISS at interpreter exit takes about half a second and
    does nothing a finished command needs: every file the engine writes is already closed and
    fsynced by then.
    """
    code = 0
    try:
        run(typer_app)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            typer.echo(str(e.code), err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
