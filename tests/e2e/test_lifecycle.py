"""Start and stop: tapwire leaves nothing attached behind it, after SIGTERM and after kill -9.

Attachments are file descriptors owned by the agent (nothing is pinned), so the kernel frees
every program when the process goes away, however it goes away. This checks it with bpftool.
"""

from __future__ import annotations

import signal
import subprocess

import procs
from procs import loaded_programs, programs_of, wait_until_unloaded

# Program names as bpftool shows them (from BTF, so not cut to 15 characters).
HOOKS = [
    "sys_enter_read", "sys_exit_read", "sys_enter_write", "sys_exit_write",
    "sys_enter_readv", "sys_exit_readv", "sys_enter_writev", "sys_exit_writev",
    "sys_enter_recvfrom", "sys_exit_recvfrom", "sys_enter_sendto", "sys_exit_sendto",
    "sys_enter_recvmsg", "sys_exit_recvmsg", "sys_enter_sendmsg", "sys_exit_sendmsg",
    "sys_enter_sendfile64", "sys_exit_sendfile64", "sys_enter_close",
    "sock_send_length", "sock_recv_length", "inet_sock_set_state",
    "tcp_retransmit_skb", "tcp_send_reset", "tcp_receive_reset",
]


def start_agent(tapwire_bin, cgroup_path, tmp_path, label) -> tuple[procs.TapwireProcess, set[int]]:
    """Starts tapwire and returns it with the ids of its programs, checking every hook is there
    exactly once (other agents may run on a developer's machine: only this one's count)."""
    agent = procs.TapwireProcess(tapwire_bin, [str(cgroup_path)],
                                 procs.base_env({"TAPWIRE_EXPORTER": "none"}), tmp_path, label=label)
    agent.start()
    try:
        ids = programs_of(agent.pid)
        loaded = loaded_programs()
        names = sorted(loaded.get(i, "?") for i in ids)
        assert names == sorted(HOOKS), f"expected every hook loaded once, got {names}"
    except BaseException:
        agent.kill()  # never leave an agent attached behind a failed check
        raise
    return agent, ids


def test_sigterm_detaches_everything(tapwire_bin, cgroup, tmp_path):
    agent, ids = start_agent(tapwire_bin, cgroup("lifecycle-term"), tmp_path, "tapwire-term")
    assert agent.stop() == 0, agent.diagnostics()
    left = wait_until_unloaded(ids)
    assert left == {}, f"programs still loaded after SIGTERM: {sorted(left.values())}"


def test_kill_9_leaves_nothing_attached(tapwire_bin, cgroup, tmp_path):
    agent, ids = start_agent(tapwire_bin, cgroup("lifecycle-kill"), tmp_path, "tapwire-kill")
    agent.proc.send_signal(signal.SIGKILL)
    assert agent.proc.wait(10) == -signal.SIGKILL
    left = wait_until_unloaded(ids)
    assert left == {}, f"programs still loaded after kill -9: {sorted(left.values())}"


def test_bad_cgroup_is_one_clear_error(tapwire_bin, tmp_path):
    """A wrong --cgroup is a plain sentence naming it and a non-zero exit, before anything loads."""
    result = subprocess.run([tapwire_bin, "run", "--cgroup", "no-such-service-cgroup"],
                            env=procs.base_env({}), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "no-such-service-cgroup" in result.stderr and "does not exist" in result.stderr, result.stderr
