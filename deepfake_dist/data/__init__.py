"""Face data: sources (``sources``), sharding (``prepare``), shard sets (``manifest``), and the
image helpers they share (``imageio``)."""
