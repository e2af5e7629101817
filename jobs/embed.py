"""Entry point for the embed stage (Ray Data batch inference -> Iceberg `embeddings`).

    python jobs/embed.py --config conf/cluster.yaml embed.use_gpu=true embed.actors=8
    ray job submit --address http://ray-head:8265 --working-dir . -- python jobs/embed.py --config conf/cluster.yaml

On a cluster `ray.address` (or `auto` inside a submitted job) connects to the running Ray
cluster; `embed.use_gpu=true` gives each inference actor one GPU (bf16 autocast).
"""

import sys

from deepcontent.cli import entry

if __name__ == "__main__":
    entry(["embed", *sys.argv[1:]])
