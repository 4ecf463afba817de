"""`abstream chaos`: loadgen at a steady rate while processes die and services go away, then the ledger of
acknowledged events against ``event_logs FINAL`` and the rollups against ``abstream verify``.

- ``proxy``: a TCP proxy in front of the broker that can cut every connection and refuse new ones;
- ``stack``: a private stack whose processes the run may kill and restart;
- ``faults``: the seeded fault schedule and its executor;
- ``accounting``: per fault, acknowledged / stored / missing / counted twice;
- ``command``: arguments, progress, tables, exit status.
"""
