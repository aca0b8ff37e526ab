"""The soft-label cache: format and key (format.py), encoding on the device (encode.py), building
(build.py), reading (reader.py), the store (store.py) and the stages' side of it (teacher.py). See
format.py for the layout on disk."""

from kd_core.cache.build import CacheReport, build_cache, views_path, write_shard
from kd_core.cache.encode import Encoded, concat, encode_batch, to_host
from kd_core.cache.format import (
    FORMAT_VERSION,
    MANIFEST,
    STORE,
    CacheSettings,
    bytes_per_row,
    cache_key,
    decode,
    index_dtype,
    read_manifest,
    shard_file,
    verify_cache,
)
from kd_core.cache.reader import IN_MEMORY_MAX_BYTES, LogitCache, TopK, TopKTensors
from kd_core.cache.store import StoredCache, gc_store, key_lock, list_store
from kd_core.cache.teacher import TeacherLogits, autocast, expected_keys, settings

__all__ = ["FORMAT_VERSION", "IN_MEMORY_MAX_BYTES", "MANIFEST", "STORE", "CacheReport", "CacheSettings", "Encoded",
           "LogitCache", "StoredCache", "TeacherLogits", "TopK", "TopKTensors", "autocast", "build_cache",
           "bytes_per_row", "cache_key", "concat", "decode", "encode_batch", "expected_keys", "gc_store",
           "index_dtype", "key_lock", "list_store", "read_manifest", "settings", "shard_file", "to_host",
           "verify_cache", "views_path", "write_shard"]
