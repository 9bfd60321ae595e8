"""Atomic checkpoints and exact resume.

Layout of a run folder::

    RUN_DIR/checkpoints/
        step-000040/            # one complete checkpoint
            model/              # save_pretrained (a peft model saves only its adapter) + tokenizer
            optimizer.pt        # optimizer.state_dict()
            scheduler.pt        # scheduler.state_dict()
            rng.pt              # python random, numpy, torch CPU (and CUDA) generator states
            state.json          # {"step": 40, "state": {...caller's data position, selector, guide...},
                                #  "files": {"rng.pt": 6261, ...: the size of every other file}}
            COMPLETE            # written last; a folder without it is debris from a crash
        latest                  # text file naming the newest complete folder (never a symlink)

Crash safety: a checkpoint is written into `.tmp-step-000040-<pid>`, every file is fsync'ed, the
`COMPLETE` marker is written and fsync'ed last, and only then is the folder renamed to its final
name (one `rename(2)`, atomic on POSIX file systems). `latest` is replaced with `os.replace`
after the rename, so it only ever names a complete checkpoint. A kill at any instant therefore
leaves the previous checkpoint loadable: `load_checkpoint` follows `latest`, and if `latest` is
missing or names something incomplete it falls back (with a warning) to the newest complete one.

Damage after the fact (a file truncated or deleted by a full disk, a copy, a hand): `state.json`
lists every file with its size, `load_checkpoint` checks them and falls back, naming the file, to
the newest complete checkpoint that is whole. A save that fails (a full disk) removes its temp
folder and raises `CheckpointError`; temp folders of dead writers are removed before each save.

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
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError

from guidedrl.core.errors import ModelError, UserError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
COMPLETE = "COMPLETE"
FORMAT = 1
_NAME = re.compile(r"^step-(\d+)$")
_DEBRIS = re.compile(r"^\.(?:tmp-step-\d+|old-step-\d+|latest\.tmp)-(\d+)$")  # `.tmp-step-000040-<pid>`


class CheckpointError(UserError):
    """A checkpoint that cannot be written (a full disk) or no checkpoint that can be read."""


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


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` via a temp file in the same folder, fsync and os.replace: a crash at
    any instant leaves the old content or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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
    meta = {"format": FORMAT, "step": int(step), "time": time.time(), "state": state or {}}
    json.dumps(meta, allow_nan=False)  # fail before writing anything if state isn't JSON
    root = Path(run_dir) / CHECKPOINTS
    name = step_name(step)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_debris(root)  # a dead writer's half-written checkpoint may hold the space this one needs
        tmp.mkdir()
        _write_contents(tmp, model, optimizer, scheduler, tokenizer, meta)
        final = root / name
        _install(tmp, final)
        write_text_atomic(root / LATEST, name + "\n")
    except BaseException as e:  # incl. an interrupt: never leave a half-written checkpoint behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, RuntimeError, SafetensorError)):  # torch.save reports ENOSPC as a RuntimeError
            raise CheckpointError(_write_failure(Path(run_dir), name, e)) from e
        raise
    prune_checkpoints(run_dir, keep_last)
    return final


def _write_failure(run_dir: Path, name: str, err: BaseException) -> str:
    """One line: which checkpoint, why, the free space, what is still there and how to go on."""
    why = (str(err).strip().splitlines() or [""])[0]
    try:
        free = f"{shutil.disk_usage(run_dir).free / 2**20:.0f} MB free"
    except OSError:
        free = "free space unknown"
    prev = _read_latest(run_dir / CHECKPOINTS)
    kept = f"the previous checkpoint ({prev}) is kept" if prev else "no earlier checkpoint exists"
    return (f"checkpoint {name} of {run_dir} could not be written ({type(err).__name__}: {why}; {free} there); "
            f"{kept}. Free some space, then continue with: guidedrl train --resume {run_dir}")


def _write_contents(tmp: Path, model: Any, optimizer: Any, scheduler: Any, tokenizer: Any, meta: dict[str, Any]) -> None:
    """Every file of a checkpoint, then state.json with their sizes, all fsync'ed, then the
    COMPLETE marker (fsync'ed last)."""
    model.save_pretrained(tmp / "model", safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "model")
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if scheduler is not None:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / "state.json").write_text(json.dumps(meta | {"files": files}, indent=1, allow_nan=False))
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


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def remove_debris(root: Path) -> list[Path]:
    """Delete, in a `checkpoints/` folder, what crashed saves left: temp folders and files of
    processes that are gone, and step folders without COMPLETE. -> what was deleted."""
    removed: list[Path] = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        m = _DEBRIS.match(entry.name)
        pid = int(m.group(1)) if m else None
        dead = pid is not None and (pid == os.getpid() or not _pid_alive(pid))  # this process saves one at a time
        incomplete = _NAME.match(entry.name) is not None and entry.is_dir() and not (entry / COMPLETE).exists()
        if dead or incomplete:
            _remove(entry)
            removed.append(entry)
    return removed


def prune_checkpoints(run_dir: Path | str, keep_last: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last` (never the one `latest` names),
    and the debris of crashed saves (`remove_debris`). Returns what was deleted."""
    root = Path(run_dir) / CHECKPOINTS
    protect = _read_latest(root)
    complete = _complete_checkpoints(root)
    keep = {p.name for _, p in complete[-keep_last:]} | ({protect} if protect else set())
    removed = remove_debris(root)
    for _, entry in complete:
        if entry.name not in keep:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return sorted(removed)


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


def _damage(path: Path) -> str | None:
    """What is wrong with the files of a complete checkpoint (a file of its manifest missing or of
    another size), or None. Checkpoints written before the manifest existed are taken as they are."""
    files = json.loads((path / "state.json").read_text()).get("files", {})
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, {size} were written"
    return None


def read_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint in folder `path` (chosen by `load_checkpoint`)."""
    meta = json.loads((path / "state.json").read_text())
    return Checkpoint(path=path, step=int(meta["step"]), state=meta.get("state", {}))


def load_checkpoint(run_dir: Path | str, warn: Callable[[str], None] | None = None) -> Checkpoint | None:
    """The checkpoint `latest` names, or, when `latest` is missing, names an incomplete folder or a
    damaged one, the newest complete checkpoint whose files are whole (`warn`, default a logged
    warning, says which and why). None if the run has no complete checkpoint; `CheckpointError`
    if every complete one is damaged."""
    root = Path(run_dir) / CHECKPOINTS
    name = _read_latest(root)
    complete = [p for _, p in reversed(_complete_checkpoints(root))]  # newest first
    notes: list[str] = []
    if name is not None and root / name in complete:
        complete.remove(root / name)
        complete.insert(0, root / name)
    elif complete:
        notes.append(f"`latest` names {name or 'nothing'}, which is not a complete checkpoint")
    for path in complete:
        problem = _damage(path)
        if problem is None:
            if notes:
                (warn or log.warning)(f"{root}: {'; '.join(notes)}; using {path.name}")
            return read_checkpoint(path)
        notes.append(f"{path.name} is damaged ({problem})")
    if complete:
        raise CheckpointError(f"{root}: no usable checkpoint: {'; '.join(notes)}")
    return None


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

    def read(path: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError) as e:
            raise ModelError(f"{path}: cannot read the weights ({e})") from None

    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return read(single)
    index = folder / f"{stem}.safetensors.index.json"
    if not index.is_file():
        raise ModelError(f"{folder}: no {single.name} or {index.name}; not a checkpoint of this kind of model")
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    out: dict[str, torch.Tensor] = {}
    for shard in shards:
        out.update(read(folder / shard))
    return out


def _load_pt(path: Path) -> Any:
    """A torch.save'd file of a checkpoint; unreadable (damaged, missing) -> ModelError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch reports a damaged file as RuntimeError, UnpicklingError, EOFError...
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ModelError(f"{path}: cannot be read ({type(e).__name__}: {reason})") from None


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
        saved = _load_pt(path)
        try:
            optimizer.load_state_dict(saved)
        except (ValueError, KeyError) as e:  # a different set or shape of parameter groups
            raise ModelError(f"{path}: optimizer state does not fit: {e}") from None
    if scheduler is not None and (ckpt.path / "scheduler.pt").exists():
        scheduler.load_state_dict(_load_pt(ckpt.path / "scheduler.pt"))
    if rng:
        set_rng_state(_load_pt(ckpt.path / "rng.pt"))
    return ckpt.state
