"""services/operator/process_tree.py against real processes: a child that starts a grandchild."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from services.operator import process_tree


def test_descendants_reach_grandchildren_and_a_group_lists_its_live_members():
    child = subprocess.Popen([sys.executable, "-c",
                              "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
                              "'import time; time.sleep(30)']); time.sleep(30)"], start_new_session=True)
    try:
        for _ in range(100):
            below = process_tree.descendants([child.pid])
            if below:
                break
            time.sleep(0.05)
        assert len(below) == 1, below                              # the grandchild
        assert child.pid in process_tree.descendants([os.getpid()])
        assert below <= process_tree.descendants([os.getpid()])     # through the child
        assert sorted(process_tree.group(child.pid)) == sorted([child.pid, *below])
    finally:
        os.killpg(child.pid, 9)
        child.wait()
    for _ in range(100):                                            # the grandchild, reaped by init
        if not process_tree.group(child.pid):
            break
        time.sleep(0.05)
    assert process_tree.group(child.pid) == []
