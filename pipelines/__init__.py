"""Distributed side of msmae-ray: Ray Data ingest and streams, Ray Train jobs, the `msmae` CLI.

Modules import Ray lazily where they can, so `msmae --help` stays fast.
"""
