"""cachewarden for asyncio: `AsyncCache`, the application API of `Cache`, awaited.

Imported on first use of `cachewarden.AsyncCache` (or of this package): an
application that never uses asyncio never imports redis.asyncio through it.
"""

from cachewarden.aio.cache import AsyncCache

__all__ = ["AsyncCache"]
