"""The supervisor of `sluice up` as PID 1 (a container started without an init): the orphans
of the stack are its children, and it reaps them; the stack's own process it leaves to
`Popen`. Run in a PID namespace of its own (`unshare`, as an unprivileged user namespace)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# util-linux's, in every Debian; an unprivileged user namespace, so that no root is needed.
UNSHARE = ("unshare", "--user", "--map-root-user", "--pid", "--fork")
AS_PID_1 = textwrap.dedent(
    """
    import json, os, subprocess, sys, time
    from sluice.supervisor import reap_orphans

    assert os.getpid() == 1
    stack = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    # Three processes orphaned at once (their parent shell exits), ours as PID 1's.
    subprocess.run(["sh", "-c", "for i in 1 2 3; do (sleep 0.1 &); done"], check=True)
    time.sleep(1.0)
    exited = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    reaped = reap_orphans(keep=stack.pid)
    again = reap_orphans(keep=stack.pid)
    stack_runs = stack.poll() is None
    stack.kill()
    print(json.dumps({"zombie_before": exited is not None, "reaped": reaped, "again": again,
                      "stack_runs": stack_runs, "stack_status": stack.wait()}))
    """
)


def test_as_pid_1_the_supervisor_reaps_orphans_and_leaves_the_stack_to_popen():
    out = subprocess.run(
        [*UNSHARE, sys.executable, "-c", AS_PID_1],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts == {
        "zombie_before": True,
        "reaped": 3,
        "again": 0,
        "stack_runs": True,
        "stack_status": -9,
    }, out.stderr
