"""Recovery checks: what proves a failed-over copy of this machine works, run inside that copy
(docs/recovery-checks.md).

- runner.py: `mobility recovery-check` runs the built-in checks and the machine's own executables in
  /etc/mobility/recovery.d/, each bounded in time, and reports each one passed, failed or skipped;
- postgresql.py: the built-in PostgreSQL check (the server starts and replays its WAL, `pg_amcheck --all`, pgbench's
  balance invariant where pgbench's tables are);
- builtins.py: the agent's own checks, each written into recovery.d as a small script an operator may replace."""
