"""cgroup v2 helpers: find the mount, create a test cgroup, start a process inside it, tear it down.

The cgroup2 hierarchy is at /sys/fs/cgroup on pure-v2 hosts and at /sys/fs/cgroup/unified on hybrid
ones (like the project's machines): always look it up in /proc/self/mounts.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path


def cgroup2_mount() -> Path:
    """The first cgroup2 mount point listed in /proc/self/mounts."""
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == "cgroup2":
                # Mount points escape spaces etc. as octal (\040).
                return Path(fields[1].encode().decode("unicode_escape"))
    raise RuntimeError("no cgroup2 filesystem in /proc/self/mounts; tapwire needs cgroup v2")


def procs(cgroup: Path) -> list[int]:
    """The pids currently in `cgroup` (not its descendants)."""
    try:
        text = (cgroup / "cgroup.procs").read_text()
    except FileNotFoundError:
        return []
    return [int(p) for p in text.split()]


def cgroup_of(pid: int) -> str:
    """The cgroup v2 path of `pid`, relative to the cgroup2 mount (e.g. '/tapwire-e2e-x-1')."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise RuntimeError(f"pid {pid} has no cgroup v2 entry")


def create(name: str, parent: Path | None = None) -> Path:
    """Creates a fresh cgroup `name` under `parent` (default: the cgroup2 root).

    A leftover of the same name (from a crashed earlier run) is removed first.
    """
    path = (parent or cgroup2_mount()) / name
    if path.exists():
        remove(path)
    path.mkdir()
    return path


def kill_all(cgroup: Path, timeout: float = 10.0) -> None:
    """Kills every process in `cgroup` and its descendants and waits until they are gone."""
    kill_file = cgroup / "cgroup.kill"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = _all_procs(cgroup)
        if not pids:
            return
        if kill_file.exists():
            kill_file.write_text("1")
        else:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.05)
    raise RuntimeError(f"processes {_all_procs(cgroup)} survived SIGKILL in {cgroup}")


def remove(cgroup: Path, timeout: float = 10.0) -> None:
    """Kills the cgroup's processes, then removes it and its descendants (retrying EBUSY)."""
    if not cgroup.exists():
        return
    kill_all(cgroup, timeout)
    # Children first: rmdir only works on a cgroup without child cgroups.
    children = sorted((p for p in cgroup.rglob("*") if p.is_dir()),
                      key=lambda p: len(p.parts), reverse=True)
    for path in [*children, cgroup]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as err:
                # EBUSY: exiting tasks not reaped yet, or a process joined after the kill.
                if err.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise RuntimeError(f"cannot remove cgroup {path}: {err}; "
                                       f"procs={procs(path)}") from err
                kill_all(path, timeout)
                time.sleep(0.05)


def popen_in_cgroup(cgroup: Path, argv: list[str], env: dict[str, str] | None = None,
                    join_timeout: float = 5.0, **popen_kwargs) -> subprocess.Popen:
    """Starts `argv` as a process that is already in `cgroup` when it execs.

    A tiny shell moves itself into the cgroup and then execs argv, so the pid is the service's
    own pid and not one of its instructions runs outside the cgroup. (preexec_fn would do the same
    but is unsafe in a process with threads, and the test process runs gRPC threads.)
    """
    procs_file = cgroup / "cgroup.procs"
    wrapper = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(procs_file), *argv]
    proc = subprocess.Popen(wrapper, env=env, **popen_kwargs)
    # Return only once it is in the cgroup, so callers never race the wrapper's write.
    deadline = time.monotonic() + join_timeout
    while proc.pid not in procs(cgroup):
        if proc.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited with {proc.returncode} before joining {cgroup}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(5)
            raise RuntimeError(f"{argv[0]} (pid {proc.pid}) did not join {cgroup} "
                               f"within {join_timeout}s")
        time.sleep(0.005)
    return proc


def _all_procs(cgroup: Path) -> list[int]:
    pids = procs(cgroup)
    if cgroup.exists():
        for child in cgroup.rglob("cgroup.procs"):
            if child.parent != cgroup:
                pids.extend(procs(child.parent))
    return pids


def remove_stale(prefix: str = "tapwire-e2e-") -> list[Path]:
    """Removes `<prefix>...-<pid>` cgroups left by test runs whose process <pid> is gone."""
    removed = []
    for path in cgroup2_mount().glob(prefix + "*"):
        owner = path.name.rsplit("-", 1)[-1]
        if path.is_dir() and owner.isdigit() and not Path(f"/proc/{owner}").exists():
            remove(path)
            removed.append(path)
    return removed
