"""Which base model a run starts from: where its files are, and what exactly it was.

A path lookup and a few hashes, without Unsloth, so the export scripts start without the training
stack.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fasttune import UserError, rundir


def resolve(name: str) -> str:
    """'tiny' -> the cached tiny checkpoint; a local directory or a hub name as is."""
    if name == "tiny":
        from fasttune.tiny import tiny_model_dir

        return str(tiny_model_dir())
    if Path(name).exists() and not (Path(name) / "config.json").is_file():
        raise UserError(f"--model {name}: a directory without config.json; pass a Hugging Face model directory")
    return name


def identity(name: str) -> dict:
    """What the run records about its base model: the name as given, the local directory the weights
    were read from, the hub revision (the snapshot's commit) when it came from the hub cache, and the
    sha256 of its config.json and weight index, which change when the weights do.

    Hashing every weight file would cost a minute per 7B; the config and the safetensors headers
    (sizes and dtypes of every tensor) are what a different checkpoint changes in practice.
    """
    path = Path(resolve(name))
    revision = None
    if not path.exists():  # a hub name: the snapshot the cache holds (offline: no network)
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(name, local_files_only=True))
        except Exception:  # noqa: BLE001  (any hub error means: not in the cache)
            return {"name": name, "path": None, "revision": None, "config_sha256": None}
        revision = path.name  # snapshots/<commit>
    weights = sorted(p.name for p in path.glob("*.safetensors"))
    digest = hashlib.sha256()
    for weight in weights:  # the header: every tensor's name, dtype, shape and offsets
        with open(path / weight, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(size, 100 << 20)))
    return {"name": name, "path": str(path.resolve()), "revision": revision,
            "config_sha256": rundir.sha256(path / "config.json") if (path / "config.json").is_file() else None,
            "weights_sha256": digest.hexdigest() if weights else None}


def changed(recorded: dict) -> str | None:
    """How the base model differs from what the run recorded (None when it does not)."""
    now = identity(recorded["path"] if recorded.get("path") and Path(recorded["path"]).exists() else recorded["name"])
    if recorded.get("path") and now["path"] is None:
        return f"base model {recorded['name']}: not found (the run used {recorded['path']})"
    for key, what in (("config_sha256", "config.json"), ("weights_sha256", "weights (safetensors headers)"),
                      ("revision", "hub revision")):
        if recorded.get(key) and now.get(key) and recorded[key] != now[key]:
            return (f"base model {recorded['name']}: its {what} changed since training ({key} "
                    f"{recorded[key][:12]}... then, {now[key][:12]}... now)")
    return None
