"""Entry point for the pretrain stage (Ray Train + Ray Data, contrastive).

    python jobs/pretrain.py --config conf/cluster.yaml pretrain.num_workers=8
    ray job submit --address http://ray-head:8265 --working-dir . -- python jobs/pretrain.py --config conf/cluster.yaml

On a cluster, ``ray.address`` in the config (or ``auto`` inside a submitted job) connects to the
running Ray cluster; ``pretrain.use_gpu=true`` gives one worker per GPU with NCCL and bf16.
"""

import sys

from deepcontent.cli import entry

if __name__ == "__main__":
    entry(["pretrain", *sys.argv[1:]])
