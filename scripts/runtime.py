"""Run-level safety of the bundle's workflows: errors, command-line checks, locks, storage.

The configs call these from explicit `initialize:` / `finalize:` steps:

- `install_error_hook`: the project's own errors (`BundleError`, `scripts.data.subjects.DataError`)
  reach the user as the last line of the output, short and with the fix, even when MONAI
  wraps them in `RuntimeError: Failed to instantiate component ...`.
- `check_command_line`: every `--key` given to `python -m monai.bundle run` must name an
  entry of the config (an unknown key is an error naming the closest known one).
- `check_positive`: settings such as `--base_channels 0` fail at once with the fix.
- `lock_directory` / `release_locks`: an exclusive lock file (with the holder's PID) on the
  checkpoint or output folder, so two runs never write into one folder; the lock of a dead
  process is taken over.
- `check_writable` / `check_free_space`: a read-only or full folder fails before epoch 1.
"""

from __future__ import annotations

import ast
import atexit
import difflib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Sequence

LOCK_NAME = ".cmer.lock"
TRACEBACK_ENV = "CMER_TRACEBACK"  # set to 1 to see full tracebacks of the project's errors
# Arguments of monai.bundle's `run` itself, not config overrides.
RUN_ARGUMENTS = frozenset({"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking",
                           "args_file", "workflow_name", "workflow_type", "properties_path", "help"})


class BundleError(Exception):
    """A mistake in how the bundle was run; the message says what is wrong and the fix."""


class LockError(BundleError):
    """The folder is in use by another run."""


class StorageError(BundleError):
    """A folder is not writable or has too little free space."""


class MissingCheckpoint(BundleError, FileNotFoundError):
    """No checkpoint where one is needed."""


# --------------------------------------------------------------------------- last-line errors


def project_error(err: BaseException | None) -> BaseException | None:
    """The first BundleError / DataError in the chain of causes of `err` (None when there is none)."""
    from scripts.data.subjects import DataError

    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (BundleError, DataError)):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def one_line(err: BaseException) -> str:
    """`Name: message` on one line (a multi-line message is joined with spaces)."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def _error_hook(kind, value, traceback, previous=sys.__excepthook__) -> None:
    error = project_error(value)
    if error is None or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        previous(kind, value, traceback)
        return
    # MONAI's wrappers and the engine's frames add nothing to a message that already names the
    # file and the fix; the traceback stays one variable away.
    print(f"(traceback hidden; set {TRACEBACK_ENV}=1 to see it)", file=sys.stderr)
    print(one_line(error), file=sys.stderr, flush=True)


def install_error_hook() -> None:
    """Print the project's errors as one last line (sys.excepthook); other errors are untouched."""
    if getattr(sys.excepthook, "_cmer", False):
        return
    previous = sys.excepthook

    def hook(kind, value, traceback):
        _error_hook(kind, value, traceback, previous)

    hook._cmer = True
    sys.excepthook = hook


# --------------------------------------------------------------------------- command-line checks


def _parse_files(value) -> list[str]:
    """--config_file value as given on the command line: one path or a Python list literal."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith("["):
        return [str(v) for v in ast.literal_eval(text)]
    return [text]


def command_line_keys(argv: Sequence[str]) -> dict[str, str | None]:
    """{key: value} of the `--key value` / `--key=value` pairs of a fire command line."""
    pairs: dict[str, str | None] = {}
    index = 0
    while index < len(argv):
        token = argv[index]
        if token.startswith("--") and len(token) > 2:
            key, sep, value = token[2:].partition("=")
            if not sep:
                following = argv[index + 1] if index + 1 < len(argv) else None
                value = None if following is None or following.startswith("--") else following
                index += 0 if value is None else 1
            pairs[key.replace("-", "_") if key.replace("-", "_") in RUN_ARGUMENTS else key] = value
        index += 1
    return pairs


def known_keys(parser) -> list[str]:
    """Every id of a ConfigParser's config, nested ones as `a#b#c`."""
    found: list[str] = []

    def walk(node, prefix: str) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in items:
            name = f"{prefix}#{key}" if prefix else str(key)  # '#': the separator the README uses
            found.append(name)
            walk(child, name)

    walk(parser.get(), "")
    return found


def _accepted_argument(parser, key: str) -> bool:
    """True when `key` adds an argument to a `_target_` component of the config that takes it
    (e.g. --train#trainer#epoch_length): MONAI passes it on, so it is not a typo."""
    import inspect
    from pydoc import locate

    from monai.bundle.config_item import ComponentLocator

    parent, _, name = key.rpartition("#")
    if not parent or parent not in parser or not isinstance(parser[parent], dict):
        return False
    if name in ("_disabled_", "_requires_", "_desc_", "_mode_"):
        return True
    target = parser[parent].get("_target_")
    if not isinstance(target, str) or target.startswith(("$", "@")):
        return False
    if "." not in target:
        module = ComponentLocator().get_component_module_name(target)
        target = f"{module[0] if isinstance(module, list) else module}.{target}" if module else target
    component = locate(target)
    if component is None:
        return False
    try:
        parameters = inspect.signature(component).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in parameters)


def check_overrides(config_files: Sequence[str], keys: Iterable[str], extra_keys: Iterable[str] = ()) -> None:
    """Raise a BundleError for the first key that names no entry of the merged config files.

    Args:
        config_files: the config files of the run (merged in order, as monai.bundle does).
        keys: override keys, e.g. ["epochs", "train#trainer#max_epochs"].
        extra_keys: further accepted keys (e.g. the settings of --tracking).
    """
    from monai.bundle import ConfigParser
    from monai.bundle.utils import ID_SEP_KEY, MERGE_KEY

    parser = ConfigParser()
    parser.read_config(f=list(config_files))
    extra = set(extra_keys)
    for key in keys:
        normalised = key.lstrip(MERGE_KEY).replace(ID_SEP_KEY, "#")
        if normalised in extra or normalised.split("#")[0] in extra or normalised in parser:
            continue
        if _accepted_argument(parser, normalised):
            continue
        candidates = known_keys(parser) + sorted(extra)
        close = difflib.get_close_matches(normalised, candidates, n=1, cutoff=0.6)
        hint = f"did you mean --{close[0]}?" if close else "use a name the config defines."
        raise BundleError(f"unknown setting --{key} (no such entry in {', '.join(config_files)}). Fix: {hint}")


def _tracking_keys(tracking) -> list[str]:
    if not tracking:
        return []
    from monai.bundle import ConfigParser
    from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

    settings = DEFAULT_EXP_MGMT_SETTINGS.get(tracking) or ConfigParser.load_config_files(tracking)
    return list(settings.get("configs", {}))


def check_command_line(argv: Sequence[str] | None = None) -> None:
    """Check the override keys of a `python -m monai.bundle run ...` command line.

    Does nothing when the process is not that command (e.g. a workflow built in Python, whose
    overrides are keyword arguments the caller chose).

    Args:
        argv: the command line (default: sys.argv).
    """
    argv = list(sys.argv if argv is None else argv)
    parts = Path(argv[0]).parts if argv else ()
    if parts[-3:] != ("monai", "bundle", "__main__.py") or len(argv) < 2 or argv[1] != "run":
        return
    pairs = command_line_keys(argv[2:])
    if pairs.get("args_file"):  # defaults from a file, overrides included
        from monai.bundle import ConfigParser

        pairs = {**{k: str(v) for k, v in ConfigParser.load_config_files(pairs["args_file"]).items()}, **pairs}
    if not pairs.get("config_file"):
        return
    keys = [k for k in pairs if k not in RUN_ARGUMENTS]
    check_overrides(_parse_files(pairs["config_file"]), keys, _tracking_keys(pairs.get("tracking")))


def check_positive(**settings) -> None:
    """Each named setting must be a positive integer (a list: every element), e.g.
    `check_positive(base_channels=@base_channels, epochs=@epochs)`.

    Args:
        settings: name -> value; the name is the command-line option without `--`.
    """
    for name, value in settings.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            kind = "a list of positive integers" if isinstance(value, (list, tuple)) else "a positive integer"
            raise BundleError(f"--{name} must be {kind}, got {value!r}. Fix: pass e.g. the config's default (with a "
                              f"trained model: the value it was trained with).")


def as_flag(value, name: str) -> bool:
    """A yes/no setting from the config or the command line (`--overwrite true` arrives as the
    string 'true': fire only turns Python literals such as True into booleans)."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", "none", ""):
        return False
    raise BundleError(f"--{name} must be true or false, got {value!r}. Fix: pass --{name} true or --{name} false.")


# --------------------------------------------------------------------------- locks

_held: dict[Path, str] = {}  # lock file -> the text this process wrote into it


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _read_lock(path: Path) -> tuple[str, dict]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return "", {}
    try:
        return text, json.loads(text)
    except ValueError:  # being written right now, or damaged
        return text, {}


def _is_stale(info: dict, text: str, path: Path) -> bool:
    """A lock is stale when its holder is gone: a dead PID on this host, or a PID of this very
    process that this process does not hold (a PID reused after a kill, e.g. in a container)."""
    if not info:
        # Unreadable content: stale only when it has not changed for a while (not mid-write).
        try:
            return time.time() - path.stat().st_mtime > 10
        except FileNotFoundError:
            return True
    if info.get("host") != socket.gethostname():
        return False  # cannot tell for a process on another machine
    pid = int(info.get("pid", -1))
    if pid == os.getpid():
        return _held.get(path) != text
    return pid <= 0 or not _pid_alive(pid)


def _take_over(path: Path, stale_text: str) -> None:
    """Remove a stale lock, guarded so two processes cannot both remove and re-create it."""
    guard = path.with_name(path.name + ".takeover")
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            if time.time() - guard.stat().st_mtime > 30:  # a taker-over that died
                guard.unlink(missing_ok=True)
        except FileNotFoundError:
            pass  # the other taker-over has just finished
        return
    try:
        if _read_lock(path)[0] == stale_text:  # still the same stale lock
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)
        guard.unlink(missing_ok=True)


def lock_directory(directory, flag: str = "--output_dir", purpose: str = "run", enabled: bool = True) -> Path | None:
    """Take the exclusive lock of `directory` (created when missing) for this process.

    Args:
        directory: the folder a run writes into (checkpoints, outputs).
        flag: the command-line option that names it (used in the error message).
        purpose: what this run is (training, inference, ...), written into the lock.
        enabled: False skips locking (e.g. on the ranks > 0 of a multi-process run).

    Returns the lock file. Raises LockError naming the holder's PID when a live process holds it.
    """
    if not enabled:
        return None
    folder = Path(directory).expanduser().absolute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError(f"cannot create {flag} {folder} ({err.strerror or err}). Fix: choose a folder you can "
                           f"write to with {flag} DIR.") from err
    path = folder / LOCK_NAME
    if path in _held and _read_lock(path)[0] == _held[path]:
        return path  # this process holds it already (a second workflow of the same process)
    text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:500]})
    for _attempt in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held_text, info = _read_lock(path)
            if _is_stale(info, held_text, path):
                _take_over(path, held_text)
                continue
            # An empty lock is one a racer has just created and not yet written: it is held.
            host = info.get("host")
            who = f"PID {info.get('pid', '?')}" + (f" on {host}" if host and host != socket.gethostname() else "")
            raise LockError(f"{flag} {folder} is in use by another {info.get('purpose', 'run')} ({who}, started "
                            f"{info.get('started', '?')}; lock file {path}). Fix: wait for it to finish, or pass "
                            f"another {flag}.") from None
        except OSError as err:
            raise StorageError(f"{flag} {folder} is not writable ({err.strerror or err}). Fix: choose a folder "
                               f"you can write to with {flag} DIR.") from err
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        _held[path] = text
        return path
    raise LockError(f"could not take the lock {path} (another process keeps taking it). Fix: retry, or pass "
                    f"another {flag}.")


def release_locks() -> None:
    """Remove the lock files this process holds (a `finalize` step; also run at exit)."""
    for path, text in list(_held.items()):
        if _read_lock(path)[0] == text:
            path.unlink(missing_ok=True)
        _held.pop(path, None)


atexit.register(release_locks)


# --------------------------------------------------------------------------- storage


def check_writable(directory, flag: str = "--output_dir") -> Path:
    """Create `directory` if needed and write (then remove) a small probe file in it.

    Args:
        directory: the folder to check.
        flag: the command-line option that names it (used in the error message).
    """
    folder = Path(directory).expanduser().absolute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check.") as probe:
            probe.write(b"x" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        raise StorageError(f"{flag} {folder} is not writable ({err.strerror or err}). Fix: free space or fix the "
                           f"permissions, or pass another {flag} DIR.") from err
    return folder


def checkpoint_bytes(network, copies: int = 3) -> int:
    """Bytes of one training checkpoint: the parameters and buffers, plus the two Adam moments."""
    parameters = sum(p.numel() * p.element_size() for p in network.parameters())
    buffers = sum(b.numel() * b.element_size() for b in network.buffers())
    return copies * parameters + buffers + (1 << 20)  # + 1 MiB for the other state


def check_free_space(directory, need_bytes: int, flag: str = "--ckpt_dir", margin: float = 2.0) -> None:
    """Raise StorageError when `directory` has less than `margin` x `need_bytes` free.

    Args:
        directory: the folder checkpoints go to.
        need_bytes: the size of one checkpoint (`checkpoint_bytes(network)`).
        flag: the command-line option that names the folder.
        margin: a new checkpoint is written next to the old one before replacing it, hence 2.
    """
    folder = Path(directory).expanduser().absolute()
    free = shutil.disk_usage(folder).free
    need = int(margin * need_bytes)
    if free < need:
        raise StorageError(f"{flag} {folder} has {free / 2**20:.1f} MiB free, but a checkpoint needs "
                           f"{need / 2**20:.1f} MiB (two copies while one replaces the other). Fix: free space, "
                           f"or pass another {flag} DIR.")

