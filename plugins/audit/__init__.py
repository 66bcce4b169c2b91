"""Audit: every API call and decision recorded outside the cluster, in sinks that are plugins of their own —
`audit-db` (database, hash-chained, searchable), `audit-file` (JSON lines, hash-chained, rotated),
`audit-webhook` (batched POSTs from a disk spool), `audit-stdout`. Shared parts: `sink.py` (queue, batches,
fail mode), `chain.py` (hash chain, signatures, verification), `store.py` (tables, search), `cli.py`.
"""
