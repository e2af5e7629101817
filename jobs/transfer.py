"""Entry point for the transfer stage: genre transfer on a GTZAN-layout folder, stratified and grouped.

    python jobs/transfer.py --config conf/cluster.yaml transfer.folder=s3://datasets/gtzan/genres transfer.model=all
    ray job submit --address http://ray-head:8265 --working-dir . -- python jobs/transfer.py --config conf/cluster.yaml \
        transfer.folder=s3://datasets/gtzan/genres transfer.group_level=2
"""

import sys

from deepcontent.cli import entry

if __name__ == "__main__":
    entry(["transfer", *sys.argv[1:]])
