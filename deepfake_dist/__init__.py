"""deepfake_dist: distributed training of deepfake generators and detectors on face shards."""

__version__ = "0.1.0"
