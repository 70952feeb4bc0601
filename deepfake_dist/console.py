"""The package's one console. Messages, progress, warnings and tables go to stderr (every rank
may write there); ``results`` is stdout, kept for what a command answers (``predict``'s rows,
``shards info``), so scripts can read it without the chatter. Written to a file or a pipe (a
job's log) rather than a terminal, both are 240 columns wide, so wide tables keep their cells."""

from rich.console import Console

LOG_WIDTH = 240

console = Console(stderr=True, highlight=False, soft_wrap=True)
results = Console(highlight=False, soft_wrap=True)
for _stream in (console, results):
    if not _stream.is_terminal:
        _stream.width = LOG_WIDTH
