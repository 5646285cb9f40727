"""Push install: the configuration server installs the agent on machines over SSH/SFTP (asyncssh).

targets.py parses the hosts, known_hosts.py keeps their keys, inspect.py reads a host's release files and free
space over SFTP, remote.py runs one host's push, run.py runs many in parallel with a job per host, and
progress.py shows it (a live table on a terminal, plain lines otherwise, JSON with --json)."""
