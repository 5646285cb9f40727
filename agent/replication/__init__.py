"""Replication on the source machine: tracking writes, syncing chunks to the process server, recovery points
(docs/replication.md). The daemon imports it only once the server protects a disk."""
