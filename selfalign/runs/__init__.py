"""Run folders: a manifest, one artifact per stage, and resume after a kill at any point.

Layout of a run folder:

    DIR/manifest.json          config, versions, seeds, model hashes, command; stage status
    DIR/<stage>/...            the stage's artifacts, e.g. DIR/round1/generations.jsonl
    DIR/final/                 the run's final model

A stage is marked done in the manifest only after its artifacts are complete, so a run killed at any
point and started again with the same command skips finished stages and redoes (or continues) the rest.
Generation stages write through `ResumableJsonl`, which continues after the last complete record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import socket
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from selfalign.data.io import to_dict, write_json
from selfalign.errors import DataError, SelfalignError

T = TypeVar("T")


class _Holder:
    """What a lock lives as long as (a ResumableJsonl drops it on close)."""


def _records_follow(rest: bytes) -> bool:
    """Whether a complete JSON object line comes later in `rest`: then a bad line before it is a hand edit of this
    writer's file (to fix), not a sign that the file is someone else's."""
    for line in rest.split(b"\n")[:-1]:  # complete lines only
        try:
            if isinstance(json.loads(line), dict):
                return True
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            continue
    return False


class ResumableJsonl:
    """An append-only JSONL file that survives kill -9.

    Each record is one line written with a single `write` and flushed (fsync per batch), so after a crash
    the file holds complete lines plus at most one partial last line, with no newline after it; opening the
    file drops that partial line. A complete line that is not JSON cannot come from a crash (someone edited
    the file): opening refuses it, naming the line, rather than drop it and the good records after it. So is a
    file that is not this writer's (lines without the key fields, a JSON array given as the output): refused,
    never truncated.
    `done` holds the keys of the complete records, so a resumed stage skips them: nothing lost, nothing
    duplicated.
    """

    def __init__(self, path: str | Path, key: Callable[[dict], Any]):
        self.path = Path(path)
        if self.path.is_dir():
            raise DataError("is a folder; give a file path", str(self.path))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a parent that is a file, or a place this user cannot write
            raise DataError(f"cannot create its folder ({e.strerror})", str(self.path)) from None
        self._holder = _Holder()  # the lock lives as long as this file is open
        # one writer at a time (the same --out given twice, say), claimed before the recovery below may truncate
        release = claim_lock(self.lock_path(self.path), self._holder, str(self.path))
        self._key = key
        self.rows: list[dict] = []
        self.done: set = set()
        try:
            if self.path.exists():
                self._recover()
            self._f = open(self.path, "a", encoding="utf-8")
        except BaseException:
            release()  # refused (not this writer's file, say): the lock goes now, not when the traceback is freed
            raise

    @staticmethod
    def lock_path(path: str | Path) -> Path:
        path = Path(path)
        return path.with_name(f".{path.name}.lock")

    @classmethod
    def check_free(cls, path: str | Path) -> None:
        """Refuse now, before a model loads, a file that another live process is writing."""
        check_unlocked(cls.lock_path(path), str(path))

    def _recover(self) -> None:
        data = self.path.read_bytes()
        good_end = 0
        pos = 0
        lineno = 0
        while True:
            nl = data.find(b"\n", pos)
            if nl < 0:
                break  # what follows the last newline, if anything, is a torn write: dropped below
            lineno += 1
            line = data[pos:nl]
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    if not self.rows and not _records_follow(data[nl + 1:]):  # not a file of JSON lines at all
                        raise DataError(self._foreign("it does not hold JSON lines"), str(self.path), lineno) from None
                    raise DataError(f"not a JSON record: {err.msg} (column {err.colno}); a crash leaves only an "
                                    f"unfinished last line, so this file was changed by hand: fix or remove that "
                                    f"line, nothing was deleted", str(self.path), lineno) from None
                self._add_row(row, lineno)
            good_end = nl + 1
            pos = nl + 1
        tail = data[good_end:]
        if tail.strip():
            # a crash mid-append leaves a cut record: the start of a JSON object that does not parse. Anything else
            # after the last newline is not this writer's (a JSON array, a text file given as the output): refused,
            # never truncated
            try:
                row = json.loads(tail)
            except (json.JSONDecodeError, UnicodeDecodeError):
                row = None
                if not tail.startswith(b'{"'):  # every record this writer appends starts so
                    raise DataError(self._foreign("it does not hold JSON lines"), str(self.path), lineno + 1) from None
            if row is not None and not isinstance(row, dict):
                raise DataError(self._foreign("it does not hold JSON lines"), str(self.path), lineno + 1)
            if row is not None:  # a whole record that lost only its newline: kept
                self._add_row(row, lineno + 1)
                with open(self.path, "ab") as f:
                    f.write(b"\n")
                return
        if good_end != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)

    def _foreign(self, why: str) -> str:
        return (f"not a file of records this command writes ({why}); nothing was changed: give another output path "
                f"or remove this file")

    def _add_row(self, row, lineno: int) -> None:
        try:
            key = self._key(row)
        except (KeyError, TypeError, ValueError, AttributeError):  # another tool's records, or not an object
            raise DataError(self._foreign("a line without this file's key fields"), str(self.path), lineno) from None
        self.rows.append(row)
        self.done.add(key)

    def append(self, records: Iterable[Any]) -> int:
        n = 0
        for r in records:
            row = to_dict(r)
            k = self._key(row)
            if k in self.done:
                continue
            self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.rows.append(row)
            self.done.add(k)
            n += 1
        self._f.flush()
        os.fsync(self._f.fileno())
        return n

    def close(self) -> None:
        self._f.close()
        self._holder = None  # releases the lock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


# config keys that change how a run reaches things or prints progress, not what it computes: a resume may change
# them. `base_url`: an API critic or judge that moved to another host or port, or a wrong URL found only once a stage
# used it (the model name, which says what answers, stays locked). `processes`, `fsdp`: how many GPUs a training
# or generation stage runs on, and whether training shards the model; the same steps, model and answers either way
# (training/distributed.py, generation/parallel.py). A backend's memory and parallelism options (lean's KV cache cap,
# vLLM's memory share and parallel sizes), so that a run that ran out of memory resumes with less; and whether
# training checks its memory first (`memory_check`), which measures and changes nothing; the batch of a frozen
# reference's scoring, and how often training checkpoints and how many it keeps. Matched by leaf name, at any depth
# (`sampling.options.max_cache_gb`). Also resumable: the `batch_size` of a section that generates (how many answers
# decode at once, like `processes`), but not a training section's, which decides the steps.
RESUMABLE_KEYS = ("log_steps", "base_url", "processes", "fsdp", "max_cache_gb", "gpu_memory_utilization",
                  "tensor_parallel_size", "data_parallel_size", "memory_check", "reference_batch_size", "save_steps",
                  "keep_checkpoints")


def resumable_change(key: str, config: dict) -> bool:
    """Whether a resume may change the setting at dotted `key` of the run's `config` (see RESUMABLE_KEYS)."""
    *path, leaf = key.split(".")
    if leaf in RESUMABLE_KEYS:
        return True
    section = config
    for part in path:
        section = section.get(part) if isinstance(section, dict) else None
    return leaf == "batch_size" and isinstance(section, dict) and "learning_rate" not in section


def config_changes(old: dict, new: dict, prefix: str = "", defaults: dict | None = None) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for each leaf that differs between two config dicts. With `defaults` (the
    config class's defaults, as a dict), a key the old config lacks and the new one has at its default is no change:
    a setting added to selfalign after the run started, whose default is the behaviour the run started with."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        d = defaults.get(k) if isinstance(defaults, dict) else None
        if k not in old and isinstance(defaults, dict) and k in defaults and b == d:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{k}.", d if isinstance(d, dict) else None)
        elif a != b:
            out.append((f"{prefix}{k}", a, b))
    return out


def model_fingerprint(path: str | Path) -> dict:
    """sha256 of a model's weight files (cached next to them by size and mtime, since hashing costs ~1 s/GB); for a
    LoRA adapter folder, its base model's fingerprint too (under "base_model"), since the adapter alone does not
    say which weights it adapts. Caches (reference log-probs, implicit rewards) are keyed by it, so a folder with
    no weight file to hash is an error rather than an empty key that every such folder would share."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".gguf"))
    if not files:
        raise SelfalignError(f"{path}: no .safetensors or .gguf weight file to fingerprint")
    out: dict = {}
    for p in files:
        st = p.stat()
        cache = p.with_name(f".{p.name}.sha256")
        stamp = f"{st.st_size}:{int(st.st_mtime)}"
        digest = None
        if cache.exists():
            cached_stamp, _, cached = cache.read_text().partition(" ")
            if cached_stamp == stamp:
                digest = cached.strip()
        if digest is None:
            digest = file_sha256(p)
            try:
                cache.write_text(f"{stamp} {digest}")
            except OSError:
                pass  # read-only model folder: just don't cache
        out[p.name] = digest
    adapter = path / "adapter_config.json"
    if path.is_dir() and adapter.exists():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if base:
            from selfalign.models import resolve_model

            out["base_model"] = model_fingerprint(resolve_model(base))
    return out


def environment_versions() -> dict:
    import importlib.metadata as md

    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("selfalign", "torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return versions


LOCK_FILE = "run.lock"  # in a run folder; a ResumableJsonl's lock sits next to its file (".NAME.lock")
# what a run folder holds before its first manifest is saved: a folder with only these is a run's to start
CLAIM_GUARD = ".selfalign-claim"  # the (empty) file a folder's claims flock, for milliseconds (_one_claimer)
RUN_START_FILES = (LOCK_FILE, LOCK_FILE + ".tmp", CLAIM_GUARD, "manifest.json.tmp")


def _process_started(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None when there is no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def lock_holder(lock: str | Path) -> dict | None:
    """The live process that holds lock file `lock` (its record: pid, host, claimed_at), or None.

    A killed process leaves its lock behind; the lock records its process's start time, so a lock whose process is
    gone, or whose pid now belongs to a newer process, is no one's. A lock taken on another host cannot be checked
    from here and counts as no one's: a job moved to another node after preemption must resume without cleanup."""
    try:
        owner = json.loads(Path(lock).read_text())
        pid, started = int(owner["pid"]), float(owner["process_started"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if owner.get("host") != socket.gethostname():
        return None
    now_started = _process_started(pid)
    return owner if now_started is not None and abs(now_started - started) < 1.0 else None


def check_unlocked(lock: Path, what: str) -> None:
    """Refuse `what` (a run folder, an output file) while another live process holds its lock: two writers would
    append the same records twice and mark each other's work done. This process may hold it already."""
    owner = lock_holder(lock)
    if owner is not None and owner["pid"] != os.getpid():
        raise SelfalignError(f"{what}: another selfalign process is working on it now (pid {owner['pid']}, since "
                             f"{owner.get('claimed_at')}); wait for it, or stop it and run the same command to resume")


def claim_lock(lock: Path, holder: object, what: str) -> weakref.finalize:
    """Refuse `what` as check_unlocked does, else record this process in lock file `lock` until `holder` is dropped,
    the returned finalizer is called, or the process ends (see lock_holder)."""
    lock = Path(os.path.realpath(lock))  # one entry per file, however it was reached (a symlinked run folder)
    pid = os.getpid()
    with _one_claimer(lock.parent, what), _held_guard:
        check_unlocked(lock, what)
        held = _held.get(lock)
        if held is None or held["pid"] != pid:
            held = _held[lock] = {"claim": None, "holders": 0, "pid": pid}
        if held["claim"] is None or _claim_in(lock) != held["claim"]:  # new, or its file was removed: (re)written
            held["claim"] = os.urandom(8).hex()
            write_json(lock, {"pid": pid, "host": socket.gethostname(), "process_started": _process_started(pid),
                              "claimed_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "claim": held["claim"]})
        held["holders"] += 1
        _held[lock] = held  # (again, if a collection inside this block released the last other holder)
    return weakref.finalize(holder, _release, lock)


# lock path -> {claim, holders, pid} for each lock this process holds: the same run opened twice in one process (a
# resume in one session) shares one claim, and the lock goes when the last holder does. A forked child inherits the
# table (and the finalizers): the pid keeps it from releasing its parent's locks.
_held: dict[Path, dict] = {}
_held_guard = threading.RLock()  # finalizers run on any thread, or inside a claim on this one (a collection)
CLAIM_WAIT_SECONDS = 30.0


def _claim_in(lock: Path) -> str | None:
    try:
        return json.loads(lock.read_text()).get("claim")
    except (OSError, ValueError, AttributeError):
        return None


@contextlib.contextmanager
def _one_claimer(folder: Path, what: str):
    """Hold an exclusive flock on `folder`/.selfalign-claim while a lock there is checked and written. Without it,
    two commands started in the same instant both find the lock free and both claim it (tests/runs/test_status.py
    releases four at once: without it two or more claimed, or crashed on each other's .tmp files). The flock lasts
    milliseconds and goes with the process, so a kill cannot leave it held. A file of its own, opened for writing:
    a flock on the folder itself would wait forever under `flock DIR selfalign ...`, and NFS takes exclusive locks
    only on files open for writing. The holder removes the file as it finishes, so none is left in the user's
    folder; a waiter that then gets the removed file's flock sees that the path no longer names it, and takes the
    new one. Where flock does not exist (Windows) or the filesystem refuses it, the claim goes unguarded."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    guard = folder / CLAIM_GUARD
    deadline = time.monotonic() + CLAIM_WAIT_SECONDS
    while True:
        try:
            fd = os.open(guard, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # a folder this user cannot write: the lock's own write will say so
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() > deadline:
                raise SelfalignError(f"{what}: another process has held {guard} for {CLAIM_WAIT_SECONDS:.0f} s "
                                     f"(selfalign holds it for milliseconds): stop that process, or remove the file "
                                     f"if no process uses it") from None
            time.sleep(0.01)
            continue
        except OSError:  # the filesystem has no flock
            break
        try:
            current = os.stat(guard)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
            break
        os.close(fd)  # the previous holder removed this one as we waited for it
    try:
        yield
    finally:
        try:
            guard.unlink()  # while still holding it: a waiter on it will see it is gone
        except OSError:
            pass
        os.close(fd)  # closing the descriptor drops the flock


def _release(lock: Path) -> None:
    with _held_guard:
        held = _held.get(lock)
        if held is None or held["pid"] != os.getpid():  # not ours: a forked child's copy of its parent's table
            return
        held["holders"] -= 1
        if held["holders"] > 0:  # another holder in this process still works on it
            return
        del _held[lock]
        try:
            if _claim_in(lock) == held["claim"]:  # not another process's, taken over after ours was removed
                lock.unlink()
        except OSError:
            pass


def lock_owner(root: str | Path) -> dict | None:
    """The live process running run folder `root`, or None (see lock_holder)."""
    return lock_holder(Path(root) / LOCK_FILE)


def read_manifest(path: Path) -> dict:
    """A run's manifest.json; a damaged one (not JSON, or no stages) is a one-line SelfalignError."""
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest.get("stages"), dict):
            raise ValueError("no 'stages' mapping")
    except (ValueError, AttributeError) as e:  # JSONDecodeError is a ValueError; a JSON list has no .get
        raise SelfalignError(f"{path}: not a readable run manifest ({e}); it was changed by hand or by another "
                             f"tool: restore it, or use a new --run-dir") from None
    return manifest


def stage_done(root: str | Path, name: str) -> bool:
    """Whether run folder `root` has finished stage `name` (False when there is no run there yet)."""
    try:
        return read_manifest(Path(root) / "manifest.json")["stages"].get(name, {}).get("status") == "done"
    except (OSError, SelfalignError):  # none yet, or damaged: Run(...) says which
        return False


class Run:
    """A run folder. Recipes call `run.stage(name, fn)`; the run decides whether fn runs."""

    def __init__(self, root: str | Path, config: dict, recipe: str, seed: int | None = None,
                 defaults: dict | None = None):
        """`defaults`: the config class's defaults as a dict; a resumed run takes a key its manifest lacks (one added
        to selfalign since) when the key is at its default."""
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise SelfalignError(f"{self.root}: not a folder (--run-dir takes a new folder, or a run's to resume)")
        # (a lock file alone is a run killed as it began, or beginning now in another process)
        if self.root.is_dir() and not (self.root / "manifest.json").exists() and any(
                p.name not in RUN_START_FILES for p in self.root.iterdir()):
            # a run writes data/, eval/, final/ ... into its folder: not into a project folder given by mistake
            raise SelfalignError(f"{self.root}: a folder that holds other files and no run (no manifest.json); give "
                                 f"a new or empty folder")
        self.root.mkdir(parents=True, exist_ok=True)
        release = claim_lock(self.root / LOCK_FILE, self, str(self.root))  # one process per run folder
        try:
            self._open_manifest(config, recipe, seed, defaults)
        except BaseException:
            release()
            raise

    def _open_manifest(self, config: dict, recipe: str, seed: int | None, defaults: dict | None = None) -> None:
        self.manifest_path = self.root / "manifest.json"
        if self.manifest_path.exists():
            self.manifest = read_manifest(self.manifest_path)
            if self.manifest.get("recipe") != recipe:
                raise SelfalignError(f"{self.root}: run folder belongs to recipe "
                                     f"'{self.manifest.get('recipe')}', not '{recipe}'")
            changes = config_changes(self.manifest.get("config") or {}, config, defaults=defaults)
            locked = [(k, old, new) for k, old, new in changes if not resumable_change(k, config)]
            if locked:
                changed = "; ".join(f"{k}: {old!r} -> {new!r}" if len(repr(old) + repr(new)) < 80 else k
                                    for k, old, new in locked)
                raise SelfalignError(f"{self.root}: config differs from the one this run started with "
                                     f"({changed}); use a new --run-dir, or the same config to resume")
            self.manifest["config"] = config  # equal, or only how it reaches things or prints progress changed
            self.manifest.setdefault("resumed_at", []).append(time.strftime("%Y-%m-%dT%H:%M:%S"))
            started_in = self.manifest.get("cwd")
            if started_in and Path(started_in).resolve() != Path.cwd().resolve():
                print(f"selfalign: {self.root} was started in {started_in}; relative paths in its command and config "
                      f"now resolve from {os.getcwd()}", file=sys.stderr)
        else:
            self.manifest = {
                "recipe": recipe,
                "config": config,
                "seed": seed,
                "command": sys.argv,
                "cwd": os.getcwd(),  # where the command's relative paths (config, --model, data) start from
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "versions": environment_versions(),
                "models": {},
                "stages": {},
            }
        self.save()

    def save(self) -> None:
        write_json(self.manifest_path, self.manifest)

    def path(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def is_done(self, name: str) -> bool:
        return self.manifest["stages"].get(name, {}).get("status") == "done"

    def stage(self, name: str, fn: Callable[[], T], summary: Callable[[T], dict] | None = None) -> T | None:
        """Run `fn` unless stage `name` is already done; record its status, time and summary.

        A done stage returns the summary stored in the manifest (its artifacts are on disk under `name/`). A stage's
        `seconds` add up its attempts (a resumed stage's time is the work it took, not its last attempt's), all but
        those ended by a kill -9, which records nothing; `attempts` counts them all.
        """
        if self.is_done(name):
            return self.manifest["stages"][name].get("result")
        entry = self.manifest["stages"].setdefault(name, {})
        entry.pop("error", None)  # an earlier attempt's failure is not this attempt's
        earlier = entry.get("seconds", 0.0)
        entry.update(status="running", started_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
                     attempts=entry.get("attempts", 0) + 1)
        self.save()
        t0 = time.time()
        try:
            result = fn()
        except BaseException as e:  # recorded for `selfalign status`; Ctrl-C leaves "running", which with no owner
            entry["seconds"] = round(earlier + time.time() - t0, 2)  # reads as stopped
            if isinstance(e, Exception):
                entry.update(status="failed", error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")
            try:
                self.save()
            except OSError:  # (a full disk, say) the stage's own error is the one to report
                pass
            raise
        entry.update(status="done", seconds=round(earlier + time.time() - t0, 2))
        if summary is not None:
            entry["result"] = summary(result)
        elif isinstance(result, (dict, list, str, int, float)) or result is None:
            entry["result"] = result
        self.save()
        return result

    def record_model(self, role: str, path: str | Path) -> None:
        if not Path(path).exists():  # a finished stage's model, moved or deleted since (or a dangling link to it)
            raise SelfalignError(f"{path}: the {role} model of this run is missing (moved or deleted after its "
                                 "stage finished); put it back, or start again with a new --run-dir")
        self.manifest["models"][role] = {"path": str(Path(path).resolve()), "sha256": model_fingerprint(path)}
        self.save()
