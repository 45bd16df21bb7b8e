"""Running generated code: a throwaway directory, a separate session, resource limits and an
audit-hook guard.

`run_program(text)` writes the program into a fresh temporary directory and runs it there as
`python -I -B -c BOOTSTRAP` in a new session (its own process group), with stdin on /dev/null,
stdout and stderr in an unnamed temporary file (kept: the head and the tail), an environment
holding only PATH, locale and HOME = TMPDIR = the directory. The bootstrap, before any program
text runs (in the child itself, not in a `preexec_fn`: the evaluating process runs torch's
threads, and Python code between fork and exec of a threaded process can deadlock):

1. sets hard and soft resource limits: address space (RLIMIT_AS, 1 GiB), CPU seconds (the
   timeout + 1), file size (10 MiB), open files (64), no core files, and processes (RLIMIT_NPROC:
   the user's current task count + 16, as the kernel counts every task of the user);
2. installs an audit hook (PEP 578) refusing, with PermissionError: opening for writing, or
   opening a directory, outside the working directory; opening for reading outside it, the
   interpreter's prefixes and its import path; removing, renaming, linking, chmod/chown, mkdir,
   truncate, utime, xattrs outside it (and any such call relative to a directory descriptor);
   processes (subprocess, os.system/exec/spawn/posix_spawn/fork), signals to other processes
   (os.kill, os.killpg), sockets, ctypes (so numpy, which loads it, cannot be imported),
   raising resource limits, the gc referrer walks and replacing a function's code (`shutil.rmtree`
   works by directory descriptors and so is refused even inside the directory);
3. runs the program as `__main__` from a fresh module.

The parent waits at most `timeout` seconds (wall clock), then kills the whole process group
(SIGKILL); it kills the group after a normal exit too, so nothing the program started survives,
and removes the directory. Passed = exit status 0 within the timeout.

Limits, honestly: the hook stops the accidents generated code makes, not a determined attacker —
Python code that knows the bootstrap can reach the hook's state (e.g. by walking frames), and C
code (an installed extension module) is not audited at all. A program that calls `os.setsid`
leaves the process group and so escapes the final kill (it still cannot fork: the hook refuses
it). Resource limits are per process. RLIMIT_NPROC does not bind root (CAP_SYS_RESOURCE), which
is why the group kill exists. Reads are limited only by path, so the Python installation is
readable. For hostile code use a container or a throwaway user; this sandbox is for scoring
model completions on a machine that owns nothing the evaluating user cannot lose.
"""

from __future__ import annotations

import enum
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PROGRAM_FILE = "program.py"
OUTPUT_KEPT = 4096  # bytes of output kept: half from the head, half from the tail

# Runs in the child before the program. Everything it needs stays in `_sandbox`'s locals.
BOOTSTRAP = r"""
def _sandbox(limits):
    import os, resource, sys, types

    guard = limits.pop("guard")
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))
    with open("program.py", encoding="utf-8") as handle:
        code = compile(handle.read(), "program.py", "exec")

    real = os.path.realpath
    root = real(os.getcwd())
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    readable = tuple({real(p) for p in [*prefixes, *sys.path] if p}) + (
        root, "/dev/null", "/dev/urandom", "/dev/zero")
    writing = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    # event -> (indices of path arguments, indices of directory-descriptor arguments)
    path_events = {
        "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
        "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)),
        "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)),
        "os.symlink": ((0, 1), (2,)), "os.truncate": ((0,), ()),
        "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
        "shutil.rmtree": ((0,), (1,)),
    }
    refused = {
        "subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
        "os.forkpty", "os.kill", "os.killpg", "socket.__new__", "socket.connect",
        "socket.bind", "socket.sendto", "socket.sendmsg", "resource.setrlimit",
        "resource.prlimit", "gc.get_referrers", "gc.get_referents", "gc.get_objects",
    }

    def within(path, roots):
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False
        resolved = real(os.fsdecode(path))
        return any(resolved == r or resolved.startswith(r.rstrip("/") + "/") for r in roots)

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return  # a descriptor the process already holds
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                flags & writing)
            if writes or os.path.isdir(path):
                if not within(path, (root,)):
                    what = "writing" if writes else "opening the directory"
                    raise PermissionError(f"sandbox: {what} {path!r} outside {root} is refused")
            elif not within(path, readable):
                raise PermissionError(f"sandbox: reading {path!r} is refused")
        elif event in path_events:
            paths, descriptors = path_events[event]
            # CPython passes dir_fd=None as -1
            if any(args[i] not in (None, -1) for i in descriptors if i < len(args)) or not all(
                within(args[i], (root,)) for i in paths
            ):
                raise PermissionError(f"sandbox: {event}{args!r} outside {root} is refused")
        elif event in refused or event.startswith("ctypes."):
            raise PermissionError(f"sandbox: {event} is refused")
        elif event == "object.__setattr__" and args[1] == "__code__":
            raise PermissionError("sandbox: replacing a function's code is refused")

    main = types.ModuleType("__main__")
    main.__file__ = "program.py"
    sys.modules["__main__"] = main
    sys.argv = ["program.py"]
    if guard:
        sys.addaudithook(hook)
    return code, main.__dict__

import json, sys
_code, _namespace = _sandbox(json.loads(sys.argv[1]))
del _sandbox, json, sys
exec(_code, _namespace)
"""


class Outcome(enum.Enum):
    PASSED = "passed"  # exit status 0 within the timeout
    FAILED = "failed"  # any other exit status, or killed by a resource limit
    TIMEOUT = "timeout"  # still running at the timeout: the process group was killed


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0  # wall-clock seconds
    memory: int = 1 << 30  # address space, bytes
    file_size: int = 10 << 20  # bytes, per file written
    open_files: int = 64
    extra_processes: int = 16  # above the user's current task count


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Execution:
    outcome: Outcome
    returncode: int | None  # None after a timeout; negative: killed by that signal
    output: str  # stdout and stderr interleaved, head and tail when long
    seconds: float

    @property
    def passed(self) -> bool:
        return self.outcome is Outcome.PASSED


def run_program(program: str, limits: Limits = DEFAULT_LIMITS, *, guard: bool = True) -> Execution:
    """Run `program` in the sandbox (module docstring). `guard=False` leaves out the audit hook,
    so that tests can show the process-level limits contain what the hook would refuse."""
    workdir = Path(tempfile.mkdtemp(prefix="dimcut-sandbox-"))
    try:
        (workdir / PROGRAM_FILE).write_text(program, encoding="utf-8")
        with tempfile.TemporaryFile() as output:
            started = time.monotonic()
            process = subprocess.Popen(
                [sys.executable, "-I", "-B", "-c", BOOTSTRAP, json.dumps(_rlimits(limits, guard))],
                cwd=workdir,
                env=_environment(workdir),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, killed as a whole below
            )
            try:
                returncode = process.wait(timeout=limits.timeout)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                kill_group(process.pid)
                process.wait()
            seconds = time.monotonic() - started
            text = _kept_output(output)
    finally:
        _remove_tree(workdir)
    if returncode is None:
        outcome = Outcome.TIMEOUT
    else:
        outcome = Outcome.PASSED if returncode == 0 else Outcome.FAILED
    return Execution(outcome, returncode, text, seconds)


def kill_group(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already


def _rlimits(limits: Limits, guard: bool) -> dict:
    spec = {
        "RLIMIT_AS": limits.memory,
        "RLIMIT_CPU": math.ceil(limits.timeout) + 1,
        "RLIMIT_FSIZE": limits.file_size,
        "RLIMIT_NOFILE": limits.open_files,
        "RLIMIT_CORE": 0,
    }
    tasks = _user_tasks()
    if tasks is not None:
        spec["RLIMIT_NPROC"] = tasks + limits.extra_processes
    return {**spec, "guard": guard}


def _user_tasks() -> int | None:
    """Threads of all processes of this user (what RLIMIT_NPROC counts); None without /proc."""
    uid = str(os.getuid())
    total = 0
    try:
        entries = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return None
    for entry in entries:
        try:
            status = Path("/proc", entry, "status").read_text().splitlines()
        except OSError:
            continue  # the process ended meanwhile
        fields = dict(line.split(":", 1) for line in status if ":" in line)
        if fields.get("Uid", "").split()[:1] == [uid]:
            total += int(fields.get("Threads", "1"))
    return total


def _environment(workdir: Path) -> dict[str, str]:
    return {
        "PATH": os.defpath,
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
    }


def _kept_output(output) -> str:
    size = output.seek(0, os.SEEK_END)
    output.seek(0)
    if size <= OUTPUT_KEPT:
        return output.read().decode("utf-8", "replace")
    head = output.read(OUTPUT_KEPT // 2)
    output.seek(size - OUTPUT_KEPT // 2)
    tail = output.read()
    skipped = size - len(head) - len(tail)
    return (head + f"\n[... {skipped} bytes ...]\n".encode() + tail).decode("utf-8", "replace")


def _remove_tree(directory: Path) -> None:
    # A program may leave directories without write or search permission: restore them first.
    for top, subdirectories, _ in os.walk(directory):
        for name in subdirectories:
            path = os.path.join(top, name)
            if not os.path.islink(path):
                os.chmod(path, 0o700)
    shutil.rmtree(directory)
