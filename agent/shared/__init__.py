"""What the agent and the configuration server share, and nothing else: the wire format, the error root with its
families and the errors both sides raise, the command-line plumbing, bounded and atomic file access, secret files,
server addresses, time formatting and untrusted-text sanitising. Modules here import only the standard library and
each other (tests/test_architecture.py checks it; docs/architecture.md draws the boundary)."""
