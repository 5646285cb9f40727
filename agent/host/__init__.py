"""The host: what the agent knows of the machine it runs on and the one way it acts on it (paths under
a root, processes, OS detection, ELF and C-library facts). Below every other package of the agent."""
