"""Summarize a py-spy ``--format raw`` profile (collapsed stacks): where the samples go.

    python -m bench.profile_summary PROFILE.txt [--top 25] [--match SUBSTRING]

Idle samples (a leaf blocked in poll/epoll) are dropped unless ``--all``; what is
left approximates CPU time.  Prints, as a share of the remaining samples: each thread's share, the top functions by
self time (leaf frame) and by inclusive time (anywhere on the stack).
``--match`` restricts inclusive output to frames containing the substring.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME_LINE = re.compile(r" \(([^:()]+):\d+\)$")


#: Leaf frames that mean "waiting for I/O": the pysyncobj poller and the asyncio/uvloop run loop.
IDLE_LEAVES = frozenset({"PollPoller.poll (pysyncobj/poller.py)", "Runner.run (asyncio/runners.py)",
                         "BaseEventLoop.run_forever (asyncio/base_events.py)",
                         "BaseEventLoop._run_once (asyncio/base_events.py)", "select (selectors.py)"})


def _func(frame: str) -> str:
    """'SyncObj._onTick (pysyncobj/syncobj.py:629)' -> 'SyncObj._onTick (pysyncobj/syncobj.py)'."""
    return _FRAME_LINE.sub(r" (\1)", frame)


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        m = _LINE.match(line)
        if m:
            stacks.append((m.group(1).split(";"), int(m.group(2))))
    return stacks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", default=None)
    parser.add_argument("--all", action="store_true",
                        help="keep idle samples too (a thread blocked in poll/epoll; py-spy counts those as "
                             "active in some containers)")
    args = parser.parse_args()
    stacks = load(args.profile)
    if not args.all:
        stacks = [(frames, n) for frames, n in stacks if _func(frames[-1]) not in IDLE_LEAVES]
    total = sum(n for _, n in stacks)
    if not total:
        sys.exit("no samples")
    threads: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, n in stacks:
        funcs = [_func(f) for f in frames]
        thread = "pysyncobj tick thread" if any("_autoTickThread" in f for f in funcs) else (
            "asyncio main thread" if any("run_node" in f or "Runner.run" in f for f in funcs) else "other")
        threads[thread] += n
        self_time[funcs[-1]] += n
        for f in set(funcs):
            inclusive[f] += n
    print(f"{args.profile}: {total} samples")
    for name, n in threads.most_common():
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("\nself time:")
    for name, n in self_time.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("\ninclusive:")
    shown = 0
    for name, n in inclusive.most_common():
        if args.match and args.match not in name:
            continue
        print(f"  {100 * n / total:5.1f}%  {name}")
        shown += 1
        if shown >= args.top:
            break


if __name__ == "__main__":
    main()
