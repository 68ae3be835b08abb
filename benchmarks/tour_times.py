"""How long does each line of the README's tour take at its defaults? Wall time, measured.

    python benchmarks/tour_times.py [--blocks clip,sft] [--out /tmp/tour] [--threads 1]

Runs the ``mlatlas`` lines of the README's bash blocks as written (each block's run folders,
``runs/<method>-<stamp>``, become the runs this script just made), one after another in a fresh
folder, and prints each command's wall time beside the time the README's comment states, so the
README's times can be kept true. ``--blocks`` picks the blocks by a method named in them (the
whole tour takes over an hour: BLIP and the language-model chain are the long ones). The tour
test (``tests/test_readme.py``) runs the same lines with tiny budgets; this runs them as a
newcomer does.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_readme import README, tour_commands  # noqa: E402

STATED = re.compile(r"(about [^:;,)]*?(?:min|minute|minutes|hour|hours|s)\b)")


def stated_times() -> dict[str, str]:
    """Each tour line (without 'mlatlas ') -> the time its comment states, if it states one."""
    out = {}
    for line in README.read_text().splitlines():
        if line.startswith("mlatlas ") and "#" in line:
            command, comment = line.split("#", 1)
            match = STATED.search(comment)
            if match:
                out[" ".join(command.split()[1:])] = match.group(1)
    return out


def resolve(argv: list[str], out: Path) -> list[str]:
    """A README run folder ``runs/<method>-<stamp>`` becomes the newest run of that method."""
    resolved = []
    for arg in argv:
        if arg.startswith("runs/"):
            method = Path(arg).name.rsplit("-", 2)[0]
            arg = str(sorted(out.glob(f"{method}-*"))[-1])
        resolved.append(arg)
    return resolved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", default="ddpm,edm,value_iteration,ppo,clip,sft",
                        help="comma-separated markers: a method named in each block to run")
    parser.add_argument("--out", type=Path, default=Path("/tmp/mlatlas-tour"))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stated = stated_times()
    print(f"{'seconds':>8s}  {'README says':14s} command")
    for marker in args.blocks.split(","):
        for argv in tour_commands(f"mlatlas train {marker}"):
            if "--help" in argv or argv[0] == "list":
                continue
            command = resolve(argv, args.out)
            if command[0] == "train" and "--resume" not in command:
                command += ["--out", str(args.out)]
            if args.threads is not None and command[0] in ("train", "eval", "sample"):
                command += ["--threads", str(args.threads)]
            start = time.perf_counter()
            code = subprocess.run([sys.executable, "-m", "mlatlas", *command],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
            seconds = time.perf_counter() - start
            note = "" if code == 0 else f"  (exit {code})"
            print(f"{seconds:8.1f}  {stated.get(' '.join(argv), ''):14s} mlatlas "
                  f"{' '.join(argv)}{note}", flush=True)


if __name__ == "__main__":
    main()
