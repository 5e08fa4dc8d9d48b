"""The paged KV cache's host side: page pool with prefix cache, page table, and the KV manager over both."""

from runner.engine.core.kv.manager import KVManager
from runner.engine.core.kv.page_table import PageTable
from runner.engine.core.kv.pages import PagePool, page_hash

__all__ = ["KVManager", "PagePool", "PageTable", "page_hash"]
