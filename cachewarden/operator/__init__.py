"""The operator's side: the `cachewarden` command line and the processes it runs.

`cli` (the console script: parsing) hands each verb to `commands`, or to the module
of a larger one: `doctor`, `warm` (`warm` and `jobs`), `flush`, `scheduler` (the
warming scheduler process), `devrun` (`cachewarden run`, on `embedded`'s Redis when
none answers). `heartbeat` and `exporter` are the worker's probe files and
Prometheus endpoint, and `observe` reads each entity's state for `status` and the
exporter. These modules sit above the job families and `celeryconf`; nothing below
imports them. Importing this package imports none of them.
"""
