"""`abstream loadgen`: a simulated population sent through the public HTTP surfaces, with a known answer.

One job per module:

- ``scenario``: the scenario file (population, behaviour, experiments and their true effects), validated;
- ``population``: each simulated user and what they do, drawn from a per-user seeded generator;
- ``client``: the HTTP client a device would be (batches, gzip, retries, clock skew) and the ack ledger;
- ``truth``: the exact truth of what was acknowledged, and the true effects the scenario implies;
- ``runner``: experiments created, users run at the target rate with a progress bar;
- ``check``: the pipeline's counts and results against the truth;
- ``report``: the tables.
"""
