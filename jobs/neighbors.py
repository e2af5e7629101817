"""Entry point for the neighbors stage (top-k cosine neighbours -> Iceberg `similar_tracks`).

    python jobs/neighbors.py --config conf/cluster.yaml neighbors.k=50
"""

import sys

from deepcontent.cli import entry

if __name__ == "__main__":
    entry(["neighbors", *sys.argv[1:]])
