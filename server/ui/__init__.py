"""The operator's view: the web dashboard and /metrics that `mobility-server serve` serves on its own listener
(``--ui-listen``), and what they read (docs/monitoring.md).

- ``snapshot``: the fleet as one periodic read of the database and the chunk store makes it (pure);
- ``history``: bounded in-memory samples for the charts;
- ``exposition``: the snapshot in the Prometheus text format;
- ``views``: the JSON documents of the pages;
- ``access``: who is asking (loopback, an operator's session, token or certificate) and the CSRF check;
- ``actions``: the changes the dashboard can make, each written to the audit log first;
- ``site``: the aiohttp application, its listener and its periodic jobs."""
