"""jepsen-lite: fault injection and history checking for raft-registry.

Split like etcd's robustness suite:

* ``runner``   -- cluster targets (local processes, network namespaces): start, kill, pause, partition,
  membership changes.
* ``workload`` -- client processes that drive traffic and record a history.
* ``nemesis``  -- a seeded schedule of faults and the code that applies and heals them.
* ``history``  -- invoke/ok/fail/info events, JSON lines, pairing into operations.
* ``checker``  -- pure functions over a history (linearizability, set, lease, lock, watch, revisions).
* ``report``   -- results.json, summary.txt, timeline.svg and report.html.
* ``session``  -- one run against a started cluster (what the runner executes, maybe in a namespace).
* ``scenario`` -- directed scenarios: one fault timed against one client pattern, repeated.
* ``main``     -- the command line of ``jepsen-lite/run``.
"""

__all__: list[str] = []
