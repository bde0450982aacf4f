"""Run `examples/train_pmf.py` in the processes of the multi-process tests (`launch_train_script` in conftest.py):

    ACCELERATE_USE_CPU=1 accelerate launch [--multi_gpu | --use_fsdp --fsdp_version 2 ...] tests/launch_train_pmf.py <train_pmf args>

Before running the script unchanged, this launcher
* adds the tests' `tiny-test` preset (tests/train_utils.py) to the preset table;
* with `--use_fsdp` on CPU processes, makes accelerate take its FSDP2 code paths: accelerate (1.15) selects
  `DistributedType.FSDP` only for GPU/NPU/XPU-style processes (CPU processes stay `MULTI_CPU` and the FSDP plugin built
  from the launch flags is dropped), while torch's FSDP2 (`fully_shard`) itself runs on CPU over gloo. This makes that
  one decision the other way (after the state is built, from the same plugin), so `accelerator.prepare`, `save_state`,
  `load_state` and `get_state_dict` take their real FSDP2 code paths;
* when the script ends training, makes every process write `<output_dir>/weights_hash_rank{r}.txt`: the sha256 of its
  (gathered) weights and EMAs, which the tests compare across processes and runs.
"""

import os
import runpy
import sys
from pathlib import Path

from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from pmf_diffusers.training.presets import TRAINING_PRESETS
from train_utils import TINY_TEST_PRESET, trained_objects, weights_hash_lines  # tests/ is this script's folder

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_pmf.py"
_accelerator_init = Accelerator.__init__
_end_training = Accelerator.end_training


def _init_with_fsdp_on_cpu(self, *args, **kwargs):
    _accelerator_init(self, *args, **kwargs)
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if wants_fsdp and self.state.distributed_type == DistributedType.MULTI_CPU:
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the launch flags (FSDP_* variables)
        # Both shared states: every new AcceleratorState() re-reads PartialState's fields.
        PartialState().distributed_type = self.state.distributed_type = DistributedType.FSDP


def _end_training_writing_hashes(self):
    trained = trained_objects(self)
    if trained["model"] is not None:  # collective under FSDP: every process gathers the full tensors
        lines = weights_hash_lines(trained["model"], trained["ema"])
        output_dir = Path(sys.argv[sys.argv.index("--output_dir") + 1])
        (output_dir / f"weights_hash_rank{self.process_index}.txt").write_text(lines)
    _end_training(self)


Accelerator.__init__ = _init_with_fsdp_on_cpu
Accelerator.end_training = _end_training_writing_hashes
TRAINING_PRESETS[TINY_TEST_PRESET.name] = TINY_TEST_PRESET
sys.argv = [str(SCRIPT), *sys.argv[1:]]
runpy.run_path(str(SCRIPT), run_name="__main__")
