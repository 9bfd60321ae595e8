"""Atomic checkpoints and exact resume.

Layout of a run folder::

    RUN_DIR/checkpoints/
        step-000040/            # one complete checkpoint
            model/              # save_pretrained (a peft model saves only its adapter) + tokenizer
            optimizer.pt        # optimizer.state_dict()
            scheduler.pt        # scheduler.state_dict()
            rng.pt              # python random, numpy, torch CPU (and CUDA) generator states
            state.json          # {"step": 40, "state": {...caller's data position, selector, guide...}}
            COMPLETE            # written last; a folder without it is debris from a crash
        latest                  # text file naming the newest complete folder (never a symlink)

Crash safety: a checkpoint is written into `.tmp-step-000040-<pid>`, every file is fsync'ed, the
`COMPLETE` marker is written and fsync'ed last, and only then is the folder renamed to its final
name (one `rename(2)`, atomic on POSIX file systems). `latest` is replaced with `os.replace`
after the rename, so it only ever names a complete checkpoint. A kill at any instant therefore
leaves the previous checkpoint loadable: `load_checkpoint` follows `latest`, and if `latest` is
missing or names something incomplete it falls back (with a warning) to the newest complete one.

Only one process per run folder may save (rank 0 under torchrun).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from guidedrl.core.errors import ModelError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
COMPLETE = "COMPLETE"
FORMAT = 1
_NAME = re.compile(r"^step-(\d+)$")


@dataclass
class Checkpoint:
    """A complete checkpoint on disk."""

    path: Path
    """The checkpoint folder (`RUN_DIR/checkpoints/step-000040`)."""
    step: int
    state: dict[str, Any]
    """What the caller passed as `state` to `save_checkpoint` (data position, selector, guide...)."""

    @property
    def model_dir(self) -> Path:
        """A folder loadable with `from_pretrained` (or `PeftModel.from_pretrained` for an adapter)."""
        return self.path / "model"


def step_name(step: int) -> str:
    """The folder name of the checkpoint of `step` (`step-000040`)."""
    return f"step-{step:06d}"


# ----------------------------------------------------------------------------- fsync helpers


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            _fsync_file(Path(dirpath) / name)
        _fsync_dir(Path(dirpath))


def _write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` via a temp file in the same folder and os.replace (atomic)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Generator states of python `random`, numpy's global generator, torch CPU and CUDA.

    numpy's state is stored as a tensor so that the file loads with `torch.load(weights_only=True)`.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    keys = npst["keys"].numpy().astype(np.uint32)
    np.random.set_state((npst["name"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- save


def save_checkpoint(
    run_dir: Path | str,
    step: int,
    *,
    model: Any,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    state: dict[str, Any] | None = None,
    keep_last: int = 2,
    tokenizer: Any | None = None,
) -> Path:
    """Write a complete checkpoint of `step` atomically, point `latest` at it, prune old ones.

    `model` is anything with `save_pretrained` (a transformers model, or a peft model, which
    saves only its adapter); `tokenizer`, if given, is saved into the same `model/` folder so it
    loads standalone. `state` must be JSON-serializable (step counters, data position, selector
    and guide state). Keeps the newest `keep_last` complete checkpoints (at least 1) and never
    deletes the one `latest` names. Returns the checkpoint folder.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    payload = json.dumps({"format": FORMAT, "step": int(step), "time": time.time(), "state": state or {}},
                         indent=1, allow_nan=False)  # fail before writing anything if state isn't JSON
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = step_name(step)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _write_contents(tmp, model, optimizer, scheduler, tokenizer, payload)
    final = root / name
    _install(tmp, final)
    _write_text_atomic(root / LATEST, name + "\n")
    prune_checkpoints(run_dir, keep_last)
    return final


def _write_contents(tmp: Path, model: Any, optimizer: Any, scheduler: Any, tokenizer: Any, payload: str) -> None:
    """Every file of a checkpoint, fsync'ed, then the COMPLETE marker (fsync'ed last)."""
    model.save_pretrained(tmp / "model", safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "model")
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if scheduler is not None:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(payload)
    _fsync_tree(tmp)
    with open(tmp / COMPLETE, "w") as f:
        f.write("ok\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)


def _install(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` (same step saved again) is swapped out first."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)  # `latest` may name `final` for an instant: load falls back meanwhile
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prune_checkpoints(run_dir: Path | str, keep_last: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last` (never the one `latest` names),
    incomplete step folders, and temp folders of processes that are gone. Returns what was deleted."""
    root = Path(run_dir) / CHECKPOINTS
    protect = _read_latest(root)
    complete = _complete_checkpoints(root)
    keep = {p.name for _, p in complete[-keep_last:]} | ({protect} if protect else set())
    removed: list[Path] = []
    for entry in sorted(root.iterdir()) if root.exists() else []:
        if not entry.is_dir():
            continue
        m = re.match(r"^\.(?:tmp|old)-step-\d+-(\d+)$", entry.name)
        stale_tmp = m is not None and (int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))))
        incomplete = _NAME.match(entry.name) is not None and not (entry / COMPLETE).exists()
        old_complete = _NAME.match(entry.name) is not None and (entry / COMPLETE).exists() and entry.name not in keep
        if stale_tmp or incomplete or old_complete:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


# ----------------------------------------------------------------------------- load


def _read_latest(root: Path) -> str | None:
    try:
        name = (root / LATEST).read_text().strip()
    except OSError:
        return None
    return name if _NAME.match(name) else None


def _is_complete(path: Path) -> bool:
    if not (path / COMPLETE).is_file():
        return False
    try:
        json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _NAME.match(entry.name)
        if m and entry.is_dir() and _is_complete(entry):
            found.append((int(m.group(1)), entry))
    return sorted(found)


def load_checkpoint(run_dir: Path | str) -> Checkpoint | None:
    """The checkpoint `latest` names, or the newest complete one if `latest` is missing or names
    an incomplete folder (a warning says so). None if the run has no complete checkpoint."""
    root = Path(run_dir) / CHECKPOINTS
    name = _read_latest(root)
    path = root / name if name else None
    if path is None or not _is_complete(path):
        complete = _complete_checkpoints(root)
        if not complete:
            return None
        path = complete[-1][1]
        log.warning("%s: `latest` names %s, which is not a complete checkpoint; using %s",
                    root, name or "nothing", path.name)
    meta = json.loads((path / "state.json").read_text())
    return Checkpoint(path=path, step=int(meta["step"]), state=meta.get("state", {}))


def latest_model_dir(run_dir: Path | str) -> Path | None:
    """The `model/` folder of the run's latest complete checkpoint (for `guidedrl eval RUN_DIR`)."""
    ckpt = load_checkpoint(run_dir)
    return ckpt.model_dir if ckpt is not None else None


# ----------------------------------------------------------------------------- restore


def _is_peft(model: Any) -> bool:
    peft = sys.modules.get("peft")  # a PeftModel implies peft is imported; avoid a 5 s import
    return peft is not None and isinstance(model, peft.PeftModel)


def _read_safetensors(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    """`stem.safetensors`, or the shards listed in `stem.safetensors.index.json`."""
    from safetensors.torch import load_file

    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return load_file(single, device="cpu")
    index = folder / f"{stem}.safetensors.index.json"
    if not index.is_file():
        raise ModelError(f"{folder}: no {single.name} or {index.name}; not a checkpoint of this kind of model")
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    out: dict[str, torch.Tensor] = {}
    for shard in shards:
        out.update(load_file(folder / shard, device="cpu"))
    return out


def _tied_aliases(model: torch.nn.Module) -> dict[str, set[str]]:
    """For each state-dict key, the other keys sharing its storage (tied embeddings)."""
    by_ptr: dict[int, set[str]] = {}
    sd = model.state_dict()
    for key, t in sd.items():
        by_ptr.setdefault(t.data_ptr(), set()).add(key)
    return {key: by_ptr[t.data_ptr()] - {key} for key, t in sd.items()}


def _load_plain(model: torch.nn.Module, folder: Path) -> None:
    """Strict load of a full model; keys dropped by save_pretrained because they are tied may be missing."""
    sd = _read_safetensors(folder, "model")
    aliases = _tied_aliases(model)
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise ModelError(f"{folder}: weights do not fit this model: {e}") from None
    missing = [k for k in result.missing_keys if not (aliases.get(k, set()) & sd.keys())]
    if missing or result.unexpected_keys:
        raise ModelError(f"{folder}: weights do not fit this model (missing {missing[:5]}, "
                         f"unexpected {list(result.unexpected_keys)[:5]})")


def _load_adapter(model: Any, folder: Path) -> None:
    """Load every adapter of a peft model (the default one sits in `folder`, others in subfolders)."""
    from peft import set_peft_model_state_dict

    for name in model.peft_config:
        sub = folder if name == "default" else folder / name
        sd = _read_safetensors(sub, "adapter_model")
        result = set_peft_model_state_dict(model, sd, adapter_name=name)
        if result.unexpected_keys:
            raise ModelError(f"{sub}: adapter weights do not fit this model (unexpected {result.unexpected_keys[:5]})")


def restore(
    ckpt: Checkpoint,
    model: Any,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    *,
    rng: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint into live objects, so training continues exactly where it stopped.

    Weights: a peft model gets its adapter weights, a plain model the full state dict (strict:
    every key must match, except keys tied to a loaded one). Then the optimizer and scheduler
    states (when given and saved) and, with `rng`, the python / numpy / torch generator states.
    Returns `ckpt.state` (the caller's data position, selector and guide state).
    """
    folder = ckpt.model_dir
    if _is_peft(model):
        _load_adapter(model, folder)
    else:
        if (folder / "adapter_model.safetensors").exists():
            raise ModelError(f"{folder} holds a LoRA adapter, but the model is not a peft model (set model.lora)")
        _load_plain(model, folder)
    if optimizer is not None:
        path = ckpt.path / "optimizer.pt"
        if not path.exists():
            raise ModelError(f"{ckpt.path}: no optimizer.pt to resume the optimizer from")
        try:
            optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except (ValueError, KeyError) as e:  # a different set or shape of parameter groups
            raise ModelError(f"{path}: optimizer state does not fit: {e}") from None
    if scheduler is not None and (ckpt.path / "scheduler.pt").exists():
        scheduler.load_state_dict(torch.load(ckpt.path / "scheduler.pt", map_location="cpu", weights_only=True))
    if rng:
        set_rng_state(torch.load(ckpt.path / "rng.pt", map_location="cpu", weights_only=True))
    return ckpt.state
