"""minicity's render workers die with their parent, even when it is killed with -9."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid


def _marked_processes(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def test_render_workers_exit_when_their_parent_is_killed(tmp_path):
    marker = f"SYNSEG_RENDER_TEST={uuid.uuid4().hex}"
    code = textwrap.dedent(f"""
        from synseg_jax.data.builders import minicity as b
        opts = b.MinicityOptions.create(scene_size=(32, 64), num_examples={{"sim": 100000}},
                                        workers=2)
        for i, _ in enumerate(b._render_all("sim", opts)):
            if i == 5:
                print("rendering", flush=True)
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", marker.split("=")[0]: marker.split("=")[1]}
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        assert parent.stdout.readline().strip() == "rendering"
        workers = [p for p in _marked_processes(marker) if p != parent.pid]
        assert len(workers) >= 2
    finally:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
    deadline = time.time() + 20
    while time.time() < deadline and _marked_processes(marker):
        time.sleep(0.5)
    left = _marked_processes(marker)
    for pid in left:  # do not leave them behind even if the test fails
        os.kill(pid, signal.SIGKILL)
    assert left == []
