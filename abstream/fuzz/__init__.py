"""`abstream fuzz`: property-based fuzzing of every endpoint of the gateway's /openapi.json (Schemathesis), and
hostile bodies (bombs, deep nesting, huge numbers, bad UTF-8, duplicate keys, huge headers, slow clients, NUL ids)
each checked to be refused as documented with nothing of it accepted.

One job per module: ``target`` (what is fuzzed: URL and tokens), ``stack`` (a private stack when no --url),
``schema_run`` (Schemathesis cases sent and checked), ``checks`` (what counts as a failure), ``hostile`` (the
hostile requests and the end-to-end proof), ``report`` (progress and the final table), ``main`` (the command).
Needs the ``fuzz`` extra (schemathesis), and ``embedded`` for the private stack.
"""
