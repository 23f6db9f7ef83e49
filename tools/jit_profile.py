#!/usr/bin/env python3
"""Where a CPU driver's (lavapipe's) compiled shader code spends its time, instruction by
instruction: starts a command, waits, samples it with `perf` (cpu-clock, so it works in VMs
without hardware counters), finds the hottest run of 4 KiB pages of JIT code (code outside any
mapped file), disassembles it from the live process with `gdb`, and prints each instruction
mnemonic's share of the samples and count, then the hottest instructions in context.

    tools/jit_profile.py [--wait S] [--seconds S] [--context N] -- COMMAND ...

e.g. `tools/jit_profile.py -- target/release/taming bench kernels --runs 30` while the
1024^3 product runs. Needs Debian's `linux-perf` and `gdb`, and perf_event_paranoid <= 2 (or
root). The command must still be running when sampling ends (it is stopped then).
"""
import argparse
import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wait", type=float, default=5.0, help="seconds before sampling starts (warm-up)")
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds of sampling")
    ap.add_argument("--context", type=int, default=40, help="instructions shown around the hottest one")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        sys.exit("jit_profile: no command given (tools/jit_profile.py -- COMMAND ...)")
    for tool in ("perf", "gdb"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            sys.exit(f"jit_profile: `{tool}` not found (Debian: apt-get install linux-perf gdb)")
    env = dict(os.environ, XDG_RUNTIME_DIR=os.environ.get("XDG_RUNTIME_DIR", "/tmp"))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(args.wait)
        if proc.poll() is not None:
            sys.exit(f"jit_profile: the command ended (status {proc.returncode}) before sampling began")
        with tempfile.TemporaryDirectory() as tmp:
            data = os.path.join(tmp, "perf.data")
            rec = subprocess.run(
                ["perf", "record", "-q", "-e", "cpu-clock", "-F", "5000", "-p", str(proc.pid), "-o", data,
                 "--", "sleep", str(args.seconds)], capture_output=True, text=True)
            if rec.returncode != 0:
                sys.exit(f"jit_profile: perf record failed: {rec.stderr.strip()}")
            script = subprocess.run(["perf", "script", "-i", data, "-F", "ip,dso"],
                                    capture_output=True, text=True).stdout
        if proc.poll() is not None:
            sys.exit("jit_profile: the command ended while it was sampled; give it more work")
        report(proc.pid, script, args.context)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait()


def report(pid, script, context):
    samples = collections.Counter()
    total = 0
    by_dso = collections.Counter()
    for line in script.splitlines():
        f = line.split()
        if len(f) < 2:
            continue
        total += 1
        dso = f[1].strip("()")
        # perf names code outside mapped files [unknown], [JIT] or /tmp/perf-PID.map.
        jit = dso in ("[unknown]", "[JIT]") or re.search(r"perf-\d+\.map$", dso) is not None
        by_dso["JIT code" if jit else os.path.basename(dso)] += 1
        if jit:
            samples[int(f[0], 16)] += 1
    if not samples:
        sys.exit("jit_profile: no samples in JIT code (is the command running shaders on a CPU driver?)")
    print(f"{total} samples:", ", ".join(f"{k} {100 * n / total:.1f}%" for k, n in by_dso.most_common(6)))
    # The hottest run of consecutive 4 KiB pages (a kernel's code is one such run).
    pages = collections.Counter()
    for ip, n in samples.items():
        pages[ip >> 12] += n
    hot = max(pages, key=pages.get)
    lo = hi = hot
    while pages.get(lo - 1, 0) > 0:
        lo -= 1
    while pages.get(hi + 1, 0) > 0:
        hi += 1
    start, end = lo << 12, (hi + 1) << 12
    in_run = sum(n for ip, n in samples.items() if start <= ip < end)
    print(f"hottest code: {start:#x}..{end:#x} ({(end - start) >> 10} KiB), {100 * in_run / total:.1f}% of all samples")
    # Disassemble from a sampled address (an instruction boundary) at the run's start.
    first = min(ip for ip in samples if start <= ip < end)
    count = (end - first) // 2
    gdb = subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", f"x/{count}i {first:#x}"],
                         capture_output=True, text=True, timeout=300)
    ins = []
    for line in gdb.stdout.splitlines():
        m = re.match(r"\s*(?:=>\s*)?0x([0-9a-f]+)(?:\s+<[^>]*>)?:\s+(\S+)\s*(.*)", line)
        if m and int(m.group(1), 16) < end:
            ins.append((int(m.group(1), 16), m.group(2), m.group(3)))
    if not ins:
        sys.exit(f"jit_profile: gdb could not read the code: {gdb.stderr.strip()[:300]}")
    share, count_of = collections.Counter(), collections.Counter()
    for addr, op, _ in ins:
        share[op] += samples.get(addr, 0)
        count_of[op] += 1
    print(f"{len(ins)} instructions disassembled; by mnemonic (share of the run's samples, count):")
    for op, n in share.most_common(24):
        print(f"  {op:14s} {100 * n / in_run:5.1f}%  {count_of[op]:6d}")
    top = max(range(len(ins)), key=lambda i: samples.get(ins[i][0], 0))
    print(f"around the hottest instruction (samples, address, instruction):")
    for addr, op, rest in ins[max(0, top - context // 2):top + context // 2]:
        print(f"  {samples.get(addr, 0):5d}  {addr:#x}  {op} {rest}")


if __name__ == "__main__":
    main()
