"""The daemon: its loop and schedule, health checks and figures, its records, and the local commands
that read them while it is down."""
