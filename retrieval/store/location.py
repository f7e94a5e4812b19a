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
from retrieval.store.folder import Store

__all__ = ["MODEL_PARTS", "ModelPaths", "model_record", "recorded_spec", "remember_model", "stat_key"]

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


def model_record(spec: ModelSpec, folder: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """What a manifest keeps about its model: paths both ways, checkpoint stats, fingerprint."""
    record: dict[str, Any] = {"absolute": {}, "fingerprint": fingerprint}
    for part in MODEL_PARTS:
        path = Path(getattr(spec, part)).resolve()
        record["absolute"][part] = str(path)
        record[part] = os.path.relpath(path, folder.resolve())
    record["checkpoint_stat"] = stat_key(Path(record["absolute"]["checkpoint"]))
    return record


def recorded_spec(record: dict[str, Any], folder: Path) -> ModelSpec:
    """The recorded model files: each where it is found (relative first, then absolute)."""
    chosen: list[Path] = []
    for part in MODEL_PARTS:
        relative = folder / record[part]  # an absolute path (older manifests) stays as it is
        absolute = Path(record.get("absolute", {}).get(part, relative))
        chosen.append(next((p for p in (relative, absolute) if p.exists()), absolute))
    return ModelSpec(chosen[0], chosen[1], chosen[2])


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


def stat_key(path: Path) -> list[int] | None:
    """(size, mtime_ns, ctime_ns, inode) of ``path``: while equal, its recorded sha256 holds."""
    try:
        info = path.stat()
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]
