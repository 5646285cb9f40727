"""Self-update on a source machine (docs/updates.md), one module per step of an upgrade:

- ``state``: what is on disk (update.json, target.json, upgrade.from) and the locks, each file's one owner;
- ``fetch``: the target version's bundle through TUF, unpacked into the staging directory;
- ``beside``: the verified copy placed beside the running version (versions/<v>);
- ``switch``: ``current`` switched to a version (and back), and the watcher's unit wanted at boot meanwhile;
- ``daemonctl``: the daemon restarted and watched through what supervises it (systemd, SysV, nothing);
- ``gate``: the health gate, pure: wait, commit or roll back;
- ``watcher``: the upgrade watcher (`mobility upgrade`) that runs these steps and reports the job.

Nothing here imports the bootstrapper, the daemon or the CLI: they start the watcher, never the other way round."""
