"""Releases: the installer repository (bundles and their TUF metadata) and the rollouts of its
versions to the fleet."""
