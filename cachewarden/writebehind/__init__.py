"""Write-behind: buffer writes in Redis streams, flush them in fenced, coalesced batches.

The application side is `enqueue` (what `Cache.write` and friends call); the
worker side is `dispatch` (which shards are due), `flush` (one shard's drain),
`coalesce`, `sink` (the SQL), `fence`, `backoff` and `deadletters`. Importing
this package imports none of them.
"""
