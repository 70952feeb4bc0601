import sys

from deepfake_dist.cli import main

sys.exit(main())
