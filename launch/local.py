#!/usr/bin/env python3
"""Runs `python -m synseg_jax.main` as N cooperating JAX processes on this machine.

    python launch/local.py --processes=2 --devices_per_process=4 -- \
        --config=configs/source_only.py:demo --workdir=runs/so_2x4

On a CPU each process gets M fake devices, so the multi-host code paths (global batches
stitched from process-local data, collectives between processes, one checkpoint written by
all) run on a laptop. With --gpus, process i drives GPUs i*M .. i*M+M-1 instead: the way to
use several GPUs of a workstation as several hosts would be used.

Each process writes its output to <logdir>/process_<i>.log; process 0's is also shown here,
each line prefixed with "[0]". When a process exits with an error, the others are stopped
(they would wait for it forever at their next collective) and this command exits with that
process's code after printing the end of its log. SIGINT, SIGTERM and SIGUSR1 sent to this
command go to every process: SIGTERM and SIGUSR1 make training save a checkpoint and stop
(exit code 75), and running the same command again resumes.

Only the standard library: it starts before anything is installed into the interpreter that
runs it, and what it starts is the project's own entry point.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
# After one process fails, how long the others get to exit by themselves (they may be writing
# the checkpoint the failed one asked for) before they are terminated, and then killed.
GRACE_SECONDS = 10.0
TAIL_LINES = 40


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        split = argv.index("--")
        ours, main_args = argv[:split], argv[split + 1:]
    else:
        ours, main_args = argv, []
    parser = argparse.ArgumentParser(
        description="Run synseg_jax.main as N JAX processes on this machine.",
        usage="%(prog)s --processes=N [--devices_per_process=M] [--gpus] [--logdir=D] "
              "-- <arguments of synseg_jax.main>")
    parser.add_argument("--processes", type=int, required=True, help="number of processes")
    parser.add_argument("--devices_per_process", type=int, default=1,
                        help="fake CPU devices per process, or GPUs per process with --gpus")
    parser.add_argument("--gpus", action="store_true",
                        help="give each process its own GPUs instead of fake CPU devices")
    parser.add_argument("--logdir", default=None,
                        help="where process_<i>.log go (default: <workdir>/launch_logs/<time>)")
    args = parser.parse_args(ours)
    if args.processes < 1 or args.devices_per_process < 1:
        parser.error("--processes and --devices_per_process must be at least 1")
    if not main_args:
        parser.error("give the arguments of synseg_jax.main after --")
    return args, main_args


def free_port() -> int:
    """A port nobody listens on now; process 0's coordinator binds it a moment later."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(index: int, args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    m = args.devices_per_process
    if args.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(index * m + k) for k in range(m))
        # JAX would otherwise guess one device per process under a cluster manager's variables.
        env["JAX_LOCAL_DEVICE_IDS"] = ",".join(str(k) for k in range(m))
    else:
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={m}").strip()
    # The repository first on the path: the checkout runs, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env


def show_with_prefix(stream, log_file, prefix: str) -> None:
    """Copies a process's output into its log file and to this terminal, line by line."""
    for line in stream:
        log_file.write(line)
        log_file.flush()
        sys.stdout.write(prefix + line)
        sys.stdout.flush()


def tail(path: str, lines: int = TAIL_LINES) -> str:
    with open(path, errors="replace") as f:
        return "".join(deque(f, maxlen=lines))


def exit_status(returncode: int) -> int:
    """A process killed by signal S reports -S; a shell would say 128 + S."""
    return 128 - returncode if returncode < 0 else returncode


def stop_all(procs: list[subprocess.Popen], grace_seconds: float) -> None:
    """Gives the processes `grace_seconds` to end, then terminates and finally kills them."""
    for action in (None, "terminate", "kill"):
        running = [p for p in procs if p.poll() is None]
        if not running:
            return
        for p in running:
            if action:
                getattr(p, action)()
        deadline = time.time() + grace_seconds
        while time.time() < deadline and any(p.poll() is None for p in running):
            time.sleep(0.2)


def default_logdir(main_args: list[str]) -> str:
    """Beside the run: <workdir>/launch_logs/<time> (runs/... for a workdir in a bucket)."""
    workdir = None
    for i, arg in enumerate(main_args):
        if arg.startswith("--workdir="):
            workdir = arg.split("=", 1)[1]
        elif arg == "--workdir" and i + 1 < len(main_args):
            workdir = main_args[i + 1]
    base = workdir if workdir and "://" not in workdir else "runs"
    return os.path.join(base, "launch_logs", time.strftime("%Y%m%d-%H%M%S"))


def main_command(main_args: list[str], address: str, count: int, index: int) -> list[str]:
    return [sys.executable, "-m", "synseg_jax.main", *main_args,
            f"--coordinator_address={address}", f"--num_processes={count}",
            f"--process_id={index}"]


def launch(args: argparse.Namespace, main_args: list[str], command=main_command,
           grace_seconds: float = GRACE_SECONDS) -> int:
    """Starts `command(main_args, coordinator address, count, index)` per process and watches
    them; returns 0, or the exit code of the first process that failed."""
    logdir = os.path.abspath(args.logdir or default_logdir(main_args))
    os.makedirs(logdir, exist_ok=True)
    address = f"localhost:{free_port()}"
    log_paths = [os.path.join(logdir, f"process_{i}.log") for i in range(args.processes)]
    procs, logs, copiers = [], [], []
    for i in range(args.processes):
        log = open(log_paths[i], "w")
        logs.append(log)
        # Own session: a Ctrl-C at the terminal reaches the processes once, through this
        # launcher, not a second time straight from the terminal.
        proc = subprocess.Popen(command(main_args, address, args.processes, i),
                                env=process_env(i, args), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE if i == 0 else log,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        procs.append(proc)
        print(f"process {i}: pid {proc.pid}, log {log_paths[i]}", flush=True)
        if i == 0:
            copier = threading.Thread(target=show_with_prefix, args=(proc.stdout, log, "[0] "),
                                      daemon=True)
            copier.start()
            copiers.append(copier)

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        failed = None
        while failed is None and any(p.poll() is None for p in procs):
            failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
            time.sleep(0.2)
        if failed is None:  # all ended; one may have failed in the last interval
            failed = next((i for i, p in enumerate(procs) if p.returncode != 0), None)
        if failed is not None:
            stop_all(procs, grace_seconds)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for copier in copiers:
            copier.join(timeout=10)
        for log in logs:
            log.close()
    if failed is None:
        print(f"all {args.processes} processes finished; logs in {logdir}", flush=True)
        return 0
    status = exit_status(procs[failed].returncode)
    print(f"\nprocess {failed} exited with code {status}; the last lines of "
          f"{log_paths[failed]}:\n{tail(log_paths[failed])}", file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(launch(*parse_args(sys.argv[1:])))
