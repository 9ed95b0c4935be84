"""Which base model a run starts from: where its files are, and what exactly it was.

A path lookup and a few hashes, without Unsloth, so the export scripts start without the training
stack.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fasttune import UserError, rundir


def resolve(name: str) -> str:
    """'tiny', 'tiny-qwen3', 'tiny-llama3.2', 'tiny-phi3.5' -> the cached tiny checkpoint; a directory or hub
    name as is."""
    from fasttune import tiny

    tiny_models = {"tiny": tiny.tiny_model_dir, "tiny-qwen3": tiny.tiny_qwen3_dir,
                   "tiny-llama3.2": tiny.tiny_llama3_2_dir, "tiny-phi3.5": tiny.tiny_phi3_5_dir}
    return str(tiny_models[name]()) if name in tiny_models else name


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # any one: fast, sentencepiece, BPE


def check(name: str, plan: bool = False) -> Path:
    """The folder --model names holds a model transformers can read, or a one-line error saying what is
    wrong with which file. Runs before anything is loaded; `plan=True` (--plan) needs config.json alone.

    A model folder that is not one (a file, no config.json, broken JSON, no tokenizer, no or cut-off
    weights: an interrupted download) would otherwise fail deep in transformers or Unsloth with a traceback.
    """
    path = Path(resolve(name)).expanduser()
    from_hub = not path.exists()
    if from_hub:
        path = _from_hub(name, plan)
    if not path.is_dir():
        raise UserError(f"--model {name}: a file, not a model directory; pass the folder that holds config.json")
    config = path / "config.json"
    try:
        values = json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--model {name}: {path} has no config.json; pass a Hugging Face model directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f"{config}:{e.lineno}" if isinstance(e, json.JSONDecodeError) else str(config)
        raise UserError(f"{where}: not valid JSON ({e}); download the model again") from None
    except OSError as e:  # a directory, no permission
        raise UserError(f"{config}: cannot read it ({e.strerror or type(e).__name__})") from None
    if not isinstance(values, dict) or not isinstance(values.get("model_type"), str):
        raise UserError(f"{config}: no 'model_type' string in it: not a transformers model config")
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:  # never run a folder's own Python (auto_map): the families we train are built into transformers
        AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StrictDataclassError) as e:  # a bad config
        e = e.__cause__ or e  # a config class's validator (Phi-3's rope factors) wraps the ValueError that says why
        raise UserError(f"{config}: transformers cannot read it ({type(e).__name__}: {str(e).splitlines()[0]})") \
            from None
    if plan:
        return path
    if not _has_tokenizer(path):
        raise UserError(f"--model {name}: {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                        "copy the tokenizer files next to the weights")
    if not from_hub:  # the hub's weights are checked by the download that brings them
        _check_weights(name, path)
    return path


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in TOKENIZER_FILES)


def _looks_like_a_path(name: str) -> bool:
    """'./m', '/data/m', '~/m', 'a/b/c' cannot be hub names ('org/name' or 'name')."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/") or "\\" in name


def _from_hub(name: str, plan: bool) -> Path:
    """A hub name's snapshot folder: from the cache, or (online) its config and tokenizer files alone;
    the weights are then downloaded by the training step."""
    if _looks_like_a_path(name):
        raise UserError(f"--model {name}: no such directory")
    from huggingface_hub import constants, snapshot_download

    try:
        path = Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001  (any hub error means: not in the cache)
        path = None
    if path is not None and (plan or _has_tokenizer(path)):
        return path
    if constants.HF_HUB_OFFLINE:
        where = "only partly in the Hugging Face cache (no tokenizer)" if path else \
            "no such directory, and not in the Hugging Face cache"
        raise UserError(f"--model {name}: {where} (HF_HUB_OFFLINE is set); download it with `hf download {name}` "
                        "where there is a network, or pass a directory")
    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.jinja", "*.model", "*.txt"]))
    except Exception as e:  # noqa: BLE001  (no network, unknown name, gated repo: the hub raises many types)
        raise UserError(f"--model {name}: not a local directory, and the hub cannot give it "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


MAX_HEADER_BYTES = 100 << 20  # safetensors refuses headers over 100 MB; a larger length is not a header


def _check_weights(name: str, path: Path) -> None:
    """Every weight file the folder has (or its index names) is there, and every safetensors one complete."""
    shards = []
    for index in (path / "model.safetensors.index.json", path / "pytorch_model.bin.index.json"):
        if not index.exists():
            continue
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise UserError(f"{index}: not a weight index ({type(e).__name__}: {e}); download the model again") \
                from None
        for shard in names:
            if not (path / shard).is_file():
                raise UserError(f"{index}: names {shard}, which is missing; download the model again")
        shards += [path / s for s in names if s.endswith(".safetensors")]
    files = shards or sorted(path.glob("*.safetensors"))
    if not files and not [p for p in path.glob("pytorch_model*.bin") if p.is_file()]:
        raise UserError(f"--model {name}: {path} has no weights (*.safetensors or pytorch_model*.bin)")
    for file in files:
        if not file.is_file():
            raise UserError(f"{file}: not a file; download the model again")
        size = file.stat().st_size
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")  # the header's length, then the header (JSON)
            try:
                if not 8 + n <= size or n > MAX_HEADER_BYTES:
                    raise ValueError
                header = json.loads(f.read(n))
                end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError, IndexError,
                    ValueError):
                raise UserError(f"{file}: not a safetensors file (unreadable header); download the model again") \
                    from None
        if 8 + n + end > size:
            raise UserError(f"{file}: cut off ({size} bytes, its header needs {8 + n + end}); an interrupted "
                            "download? download the model again")


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
