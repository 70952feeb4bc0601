from deepfake_dist.cli import run

run()
