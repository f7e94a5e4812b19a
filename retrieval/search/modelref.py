"""Loading the model an index was built with, from where the index recorded it, checked by
fingerprint; paths given explicitly override the recorded ones (a model that moved)."""

from __future__ import annotations

from pathlib import Path

from retrieval.errors import IndexMismatchError, ModelError
from retrieval.model.checkpoint import KnownHash
from retrieval.model.encoder import Encoder
from retrieval.store.location import MODEL_PARTS, ModelPaths, recorded_spec
from retrieval.store.manifest import Manifest

__all__ = ["load_index_encoder"]


def load_index_encoder(
    folder: Path,
    manifest: Manifest,
    paths: ModelPaths | None = None,
    *,
    device: str = "auto",
    precision: str = "auto",
) -> Encoder:
    """The model ``folder`` was built with, checked by fingerprint; ``paths`` override parts of it."""
    paths = paths or ModelPaths()
    record = manifest.model
    spec = paths.over(recorded_spec(record, folder))
    for part in MODEL_PARTS:
        path = Path(getattr(spec, part))
        if getattr(paths, part) is None and not path.exists():
            flag = "--" + part.replace("_", "-")
            raise ModelError(
                f"{folder} was built with the {part.replace('_', ' ')} {path}, which is not there any "
                f"more: pass {flag} with its new place once (accepted if it is the same model, then "
                "remembered)"
            )
    fingerprint = record.get("fingerprint") or {}
    sha, stat = fingerprint.get("checkpoint_sha256"), record.get("checkpoint_stat")
    known = KnownHash(sha, stat) if sha and stat else None
    encoder = Encoder.load(spec, device=device, precision=precision, known=known)
    digest = encoder.fingerprint.digest if encoder.fingerprint else None
    if digest != manifest.fingerprint:
        encoder.close()
        given = " given" if paths.given else ""
        raise IndexMismatchError(
            f"{folder} was built with another model than the{given} one loaded (fingerprint "
            f"{str(manifest.fingerprint)[:12]}, this one {str(digest)[:12]}): checkpoint or tower "
            "folders changed since"
        )
    return encoder
