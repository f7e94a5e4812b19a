"""``retrieval serve``: the HTTP API and web UI over one or more index folders."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from retrieval.cli.common import CheckpointOpt, DeviceOpt, TextModelOpt, TrustOpt, VisionModelOpt, model_paths

IndexesOpt = Annotated[
    list[Path],
    typer.Option("--index", help="Index folder to serve; repeat for several (the first is the default)."),
]
HostOpt = Annotated[str, typer.Option("--host", help="Address to listen on (loopback unless told).")]
KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="RETRIEVAL_API_KEY",
        show_envvar=True,
        help="Key every request but health must carry.",
    ),
]
InsecureOpt = Annotated[bool, typer.Option("--insecure", help="Allow a non-loopback --host without a key.")]
CorsOpt = Annotated[
    list[str] | None,
    typer.Option("--cors-origin", help="An origin allowed to call the API from a browser; repeatable."),
]
RootOpt = Annotated[
    Path | None,
    typer.Option("--image-root", help="Where the indexed images are on this host, if they moved."),
]
BatchOpt = Annotated[
    int, typer.Option("--max-batch", help="Queries coalesced into one batch at most (1: off).")
]
WaitOpt = Annotated[
    float, typer.Option("--max-wait-ms", help="The longest a query waits for others once the model is free.")
]
QuietOpt = Annotated[
    float, typer.Option("--quiet-ms", help="A batch starts after this long without a new query.")
]
MaxKOpt = Annotated[int, typer.Option("--max-k", help="The largest k a request may ask for.")]
UploadOpt = Annotated[float, typer.Option("--max-upload-mb", help="The largest image upload.")]
PollOpt = Annotated[float, typer.Option("--poll-seconds", help="How often to look for a new index version.")]
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", help="torch and FAISS threads [default: the cores].")
]


def serve(
    index: IndexesOpt,
    host: HostOpt = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000,
    api_key: KeyOpt = None,
    insecure: InsecureOpt = False,
    cors_origin: CorsOpt = None,
    image_root: RootOpt = None,
    max_batch: BatchOpt = 64,
    max_wait_ms: WaitOpt = 10.0,
    quiet_ms: QuietOpt = 2.0,
    max_k: MaxKOpt = 1000,
    max_upload_mb: UploadOpt = 20.0,
    poll_seconds: PollOpt = 2.0,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    checkpoint: CheckpointOpt = None,
    text_model: TextModelOpt = None,
    vision_model: VisionModelOpt = None,
    trust_checkpoint: TrustOpt = False,
) -> None:
    """Serve the search API and the web UI (http://127.0.0.1:8000/ by default)."""
    from retrieval.service.config import ServeConfig
    from retrieval.service.server import serve as run_server

    config = ServeConfig(
        indexes=tuple(index),
        host=host,
        port=port,
        api_key=api_key or None,
        insecure=insecure,
        cors_origins=tuple(cors_origin or ()),
        image_root=image_root,
        model=model_paths(checkpoint, text_model, vision_model, trust_checkpoint),
        device=device,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        quiet_ms=quiet_ms,
        max_k=max_k,
        max_upload_bytes=int(max_upload_mb * 2**20),
        poll_seconds=poll_seconds,
        threads=threads,
    ).check()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    typer.echo(f"serving {', '.join(map(str, index))} on http://{shown}:{port}/ (Ctrl-C stops)", err=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_server(config)
