"""Run by tests/test_ddp.py under ``accelerate launch``: train the tiny model with the given overrides."""

import sys

from targetsft.training.config import load_config
from targetsft.training.trainer import train

if __name__ == "__main__":
    train(load_config(None, sys.argv[1:]))
