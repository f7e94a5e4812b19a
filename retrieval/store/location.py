"""Where an index's model lives, so that commands can take ``--index`` instead of model flags.

An index records its checkpoint and tower folders relative to the index folder (they survive
moving the project as a whole) and as absolute paths (they survive moving the index alone), plus
the checkpoint's size, mtime, ctime and inode: while those are unchanged, the file's sha256 in the
fingerprint is trusted instead of hashing gigabytes again on every start. A model that moved is
found again by passing its new paths once; they are accepted when the fingerprint matches
(``retrieval.search.modelref``) and then recorded (``remember_model``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.errors import StoreError
from retrieval.model.spec import ModelSpec
from retrieval.store.folder import CATALOG, LEGACY_MANIFEST, Store

__all__ = ["MODEL_PARTS", "ModelPaths", "index_model", "model_record", "recorded_spec", "remember_model"]

MODEL_PARTS = ("checkpoint", "text_model", "vision_model")


@dataclass(frozen=True)
class ModelPaths:
    """Model files named explicitly (command-line flags); ``None`` keeps the recorded or default one."""

    checkpoint: Path | None = None
    text_model: Path | None = None
    vision_model: Path | None = None
    trust_checkpoint: bool = False

    @property
    def given(self) -> bool:
        return any(getattr(self, part) is not None for part in MODEL_PARTS)

    def over(self, base: ModelSpec | None = None) -> ModelSpec:
        """These paths where given, ``base``'s (or the defaults) elsewhere."""
        base = base or ModelSpec()
        return ModelSpec(
            self.checkpoint or base.checkpoint,
            self.text_model or base.text_model,
            self.vision_model or base.vision_model,
            trust_checkpoint=self.trust_checkpoint or base.trust_checkpoint,
        )


def model_record(
    spec: ModelSpec, folder: Path, fingerprint: dict[str, Any], checkpoint_stat: list[int] | None
) -> dict[str, Any]:
    """What an index records about its model: paths both ways, the checkpoint's stats when it was
    hashed (the loaded checkpoint's, never taken again later), the fingerprint."""
    record: dict[str, Any] = {"absolute": {}, "fingerprint": fingerprint}
    for part in MODEL_PARTS:
        path = Path(getattr(spec, part)).resolve()
        record["absolute"][part] = str(path)
        record[part] = os.path.relpath(path, folder.resolve())
    record["checkpoint_stat"] = checkpoint_stat
    return record


def recorded_spec(record: dict[str, Any], folder: Path) -> ModelSpec:
    """The recorded model files: each where it is found (relative first, then absolute)."""
    chosen: list[Path] = []
    for part in MODEL_PARTS:
        relative = Path(os.path.normpath(folder / record[part]))  # an absolute one (older manifests) stays
        absolute = Path(record.get("absolute", {}).get(part, relative))
        chosen.append(next((p for p in (relative, absolute) if p.exists()), absolute))
    return ModelSpec(chosen[0], chosen[1], chosen[2])


def index_model(folder: Path) -> ModelSpec | None:
    """The model files an index folder records, or None when ``folder`` holds no index yet."""
    if not (folder / CATALOG).is_file() and not (folder / LEGACY_MANIFEST).is_file():
        return None
    with Store.open(folder) as store:  # a damaged or unreadable catalog is an error, not "none"
        manifest = store.committed
    if manifest is None or not {"checkpoint", "text_model", "vision_model"} <= set(manifest.model):
        return None
    return recorded_spec(manifest.model, folder)


def remember_model(folder: Path, spec: ModelSpec, checkpoint_stat: list[int] | None) -> bool:
    """Record ``spec`` as where ``folder``'s model now is (its fingerprint already checked).

    Returns False, changing nothing, when a build holds the folder or it cannot be written (a
    shared, read-only index): the paths are then simply needed again next time.
    """
    try:
        store = Store.open(folder, write=True)
    except (StoreError, OSError):
        return False
    with store:
        manifest = store.manifest
        if manifest is None:
            return False
        record = model_record(spec, folder, manifest.model.get("fingerprint", {}), checkpoint_stat)
        if record != manifest.model:
            store.commit_catalog(dataclasses.replace(manifest, model=record))
    return True
