"""Run under a launcher (accelerate launch / torchrun): record which sample keys each rank reads.

    accelerate launch ... tests/dist_keys.py SHARDS OUT_DIR [NUM_BATCHES] [WORKERS]

Writes OUT_DIR/keys_rank<r>.json with the rank and world size the harness saw. Used by the
multi-process tests to prove that ranks read disjoint samples in every distributed mode.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerate import Accelerator  # noqa: E402

from harness import scale  # noqa: E402
from harness.config import DataConfig  # noqa: E402
from harness.data import TrainLoader  # noqa: E402
from harness.dist import world  # noqa: E402


def main():
    shards, out = sys.argv[1], Path(sys.argv[2])
    num_batches = int(sys.argv[3]) if len(sys.argv) > 3 else 6
    workers = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    accelerator = Accelerator(**scale.accelerator_kwargs())
    w = world()
    loader = TrainLoader(DataConfig(train=shards, image_size=16, num_workers=workers, shuffle_buffer=8),
                         rank=w.rank, world_size=w.world_size, batch_size=4)
    it = loader.batches()
    keys = [k for _ in range(num_batches) for k in next(it)["key"]]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"keys_rank{w.rank}.json").write_text(json.dumps({
        "rank": w.rank, "world_size": w.world_size, "keys": keys,
        "accelerate_num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
    }))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
