"""The install lifecycle: bundles and their fetch, install and uninstall, units, the bootstrapper,
registration and the machine's identity, template preparation."""
