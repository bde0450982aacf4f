"""Run `examples/train_pmf.py` under FSDP on CPU processes (gloo): the launched script of the FSDP tests.

    ACCELERATE_USE_CPU=1 accelerate launch --use_fsdp --fsdp_version 2 ... tests/cpu_fsdp_launch.py <train_pmf args>

accelerate (1.15) selects `DistributedType.FSDP` only for GPU/NPU/XPU-style processes; CPU processes stay `MULTI_CPU`
and the FSDP plugin built from the launch flags is dropped. torch's FSDP2 (`fully_shard`) itself runs on CPU over
gloo, so this launcher makes that one decision the other way (after the state is built, from the same plugin) and then
runs the script unchanged: `accelerator.prepare`, `save_state`, `load_state` and `get_state_dict` take their real FSDP2
code paths.
"""

import os
import runpy
import sys
from pathlib import Path

from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_pmf.py"
_accelerator_init = Accelerator.__init__


def _init_with_fsdp_on_cpu(self, *args, **kwargs):
    _accelerator_init(self, *args, **kwargs)
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if wants_fsdp and self.state.distributed_type == DistributedType.MULTI_CPU:
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the launch flags (FSDP_* variables)
        # Both shared states: every new AcceleratorState() re-reads PartialState's fields.
        PartialState().distributed_type = self.state.distributed_type = DistributedType.FSDP


Accelerator.__init__ = _init_with_fsdp_on_cpu
sys.argv = [str(SCRIPT), *sys.argv[1:]]
runpy.run_path(str(SCRIPT), run_name="__main__")
