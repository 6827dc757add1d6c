"""Scheduled warming: jobs declared in the config fill an entity's cache ahead of demand.

`source` reads a job's rows from the database (in key order, in keyset ranges),
`run` drives a run through its chunks, `schedule` fires each due time once
across every scheduler (APScheduler; worker side only), `status` reads what
the runs recorded.
"""
