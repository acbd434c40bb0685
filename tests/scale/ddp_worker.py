"""Run by tests/scale/test_ddp.py and tests/scale/test_scale_out.py under ``accelerate launch``: train the tiny model
with the given overrides, through the ``target-sft train`` command line (which also ends the process group).

With ``TARGETSFT_TEST_FSDP_ON_CPU=1`` accelerate is told that the gloo process group is a multi-device one. It
enables FSDP only on accelerators and would otherwise run plain data parallelism on a CPU; with this, the FSDP2
sharding, the Trainer's wrapping and the gathered state dict are accelerate's and torch's own, on CPU tensors.
"""

import os
import sys

import torch

from targetsft.cli.main import main


def _fsdp_on_cpu() -> None:
    from accelerate.state import DistributedType, PartialState

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        return "gloo", DistributedType.MULTI_GPU

    def set_device(self):
        self.device = torch.device("cpu")

    PartialState._prepare_backend = prepare_backend
    PartialState.set_device = set_device


if __name__ == "__main__":
    if os.environ.get("TARGETSFT_TEST_FSDP_ON_CPU") == "1":
        _fsdp_on_cpu()
    sys.exit(main(["train", *sys.argv[1:]]))
