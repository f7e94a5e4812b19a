"""Where an index's model lives, so that commands can take ``--index`` instead of model flags.

An index records its checkpoint and tower folders relative to the index folder (they survive
moving the project as a whole) and as absolute paths (they survive moving the index alone), plus
the checkpoint's size, mtime, ctime and inode: while those are unchanged, the file's sha256 in the
fingerprint is trusted instead of hashing gigabytes again on every start. A model that moved is
found again by passing its new paths once; they are accepted when the fingerprint matches and
then recorded (``remember_model``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.encoder import Encoder, ModelSpec
from retrieval.errors import IndexMismatchError, ModelError, StoreError
from retrieval.store import Manifest, Store

__all__ = ["ModelPaths", "load_index_encoder", "model_record", "recorded_spec", "remember_model"]

_PARTS = ("checkpoint", "text_model", "vision_model")


@dataclass(frozen=True)
class ModelPaths:
    """Model files named explicitly (command-line flags); ``None`` keeps the recorded or default one."""

    checkpoint: Path | None = None
    text_model: Path | None = None
    vision_model: Path | None = None
    trust_checkpoint: bool = False

    @property
    def given(self) -> bool:
        return any(getattr(self, part) is not None for part in _PARTS)

    def over(self, base: ModelSpec | None = None) -> ModelSpec:
        """These paths where given, ``base``'s (or the defaults) elsewhere."""
        base = base or ModelSpec()
        return ModelSpec(
            self.checkpoint or base.checkpoint,
            self.text_model or base.text_model,
            self.vision_model or base.vision_model,
            trust_checkpoint=self.trust_checkpoint or base.trust_checkpoint,
        )


def model_record(spec: ModelSpec, folder: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """What a manifest keeps about its model: paths both ways, checkpoint stats, fingerprint."""
    record: dict[str, Any] = {"absolute": {}, "fingerprint": fingerprint}
    for part in _PARTS:
        path = Path(getattr(spec, part)).resolve()
        record["absolute"][part] = str(path)
        record[part] = os.path.relpath(path, folder.resolve())
    record["checkpoint_stat"] = _stat(Path(record["absolute"]["checkpoint"]))
    return record


def recorded_spec(record: dict[str, Any], folder: Path) -> ModelSpec:
    """The recorded model files: each where it is found (relative first, then absolute)."""
    chosen: list[Path] = []
    for part in _PARTS:
        relative = folder / record[part]  # an absolute path (older manifests) stays as it is
        absolute = Path(record.get("absolute", {}).get(part, relative))
        chosen.append(next((p for p in (relative, absolute) if p.exists()), absolute))
    return ModelSpec(chosen[0], chosen[1], chosen[2])


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
    for part in _PARTS:
        path = Path(getattr(spec, part))
        if getattr(paths, part) is None and not path.exists():
            flag = "--" + part.replace("_", "-")
            raise ModelError(
                f"{folder} was built with the {part.replace('_', ' ')} {path}, which is not there any "
                f"more: pass {flag} with its new place once (accepted if it is the same model, then "
                "remembered)"
            )
    known = None
    fingerprint = record.get("fingerprint") or {}
    if record.get("checkpoint_stat") is not None and _stat(spec.checkpoint) == record["checkpoint_stat"]:
        known = fingerprint.get("checkpoint_sha256")
    encoder = Encoder.load(spec, device=device, precision=precision, checkpoint_sha256=known)
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


def remember_model(folder: Path, spec: ModelSpec) -> bool:
    """Record ``spec`` as where ``folder``'s model now is (its fingerprint already checked).

    Returns False, changing nothing, when a build holds the folder: the paths are then simply
    needed again next time.
    """
    try:
        store = Store.open(folder, write=True)
    except StoreError:
        return False
    with store:
        manifest = store.manifest
        if manifest is None:
            return False
        record = model_record(spec, folder, manifest.model.get("fingerprint", {}))
        if record != manifest.model:
            store.commit(dataclasses.replace(manifest, model=record))
    return True


def _stat(path: Path) -> list[int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]
