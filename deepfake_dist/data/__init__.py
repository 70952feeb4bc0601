"""Face data, from raw files to batches. Each module imports only those listed before it:

- ``common``: splits, labels and the records the others pass around (``Item``, ``ReadProblem``)
- ``locations``: where a set lives (a folder, HTTP, S3): streams that resume, listing, writing
- ``imageio``: image decode / crop / resize / encode, as ``prepare`` stores them
- ``uploads``: untrusted image bytes (the server's uploads) -> a decoded image, checked first
- ``labels``: how a sample's label is read (``cls``, another member, a json field, its key)
- ``tarstream``: the shard reader (whole samples, or headers only)
- ``manifest``: a shard set (``manifest.json`` + tars): read, verify, describe
- ``faces``: videos -> face crops (frame sampling, face detection, tracking, cropping), and a
  still image's largest face
- ``sources``: where raw faces come from, one module per ``KIND:ARG`` kind, listed in ``SOURCES``
- ``shard_writer``: plan a shard set and write it over workers x ranks, with its manifest
- ``prepare``: the ``deepfake-dist prepare`` back end (a source -> a shard set)
- ``index``: the ``deepfake-dist shards index`` back end (a manifest for shards made elsewhere)
- ``transforms``, ``handoff``, ``loader``: shards -> augmented batches on the device
"""
