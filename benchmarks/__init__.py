"""foobar_lb benchmarks: `python -m benchmarks` measures foobar_lb side by side with HAProxy
(and pproxy for TCP) with wrk, in interleaved rounds, and reports medians and ratios.

Rule: the package measures and reports; it never changes foobar_lb, and every process it
starts (nginx, haproxy, foobar_lb, pproxy, foobar_app, wrk) it stops again by its own pid.

Modules: `cli` (options, the run, exit status), `tools` (finding tools, starting and stopping
processes, /proc readings), `configs` (generated nginx, haproxy and foobar_lb configurations),
`scenarios` (what is measured and the interleaved rounds), `wrk` (running and parsing wrk),
`idle` (idle keep-alive connections for the memory scenario), `report` (results.json,
results.md, results.png), `pproxy_launch` (starting pproxy with an event loop set), `app_launch`
(starting foobar_app with a count of the connections it accepted).
"""
