"""The agent's health: checks of its own resources and its link to the server."""

from agent.daemon.health.self_checks import DiskSample, Health, ProcessSample, ServerSample, health_checks, overall

__all__ = ["DiskSample", "Health", "ProcessSample", "ServerSample", "health_checks", "overall"]
