"""The package's one console. Messages, progress, warnings and tables go to stderr (every rank
may write there); ``results`` is stdout, kept for what a command answers (``predict``'s rows,
``shards info``), so scripts can read it without the chatter."""

from rich.console import Console

console = Console(stderr=True, highlight=False, soft_wrap=True)
results = Console(highlight=False, soft_wrap=True)
