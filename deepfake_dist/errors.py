"""One exception type for problems with what the user gave us.

A ``UserError`` is printed by the CLI as a single line (no traceback): it must name the file,
key or value at fault and say how to fix it.
"""


class UserError(Exception):
    """Bad input from the user: a config key, a path, a shard, a checkpoint."""
