"""The read path: read-through with one loader per key, and refresh-ahead.

`reader` (get, get_many) over `misses` (single flight across processes, on
`singleflight`'s algorithm and the lease scripts), `sqlload` (the SQL), `xfetch`
(when to refresh early), `refresh` (batched reloads) and `sweep` (hot keys
reloaded before they expire).
"""
