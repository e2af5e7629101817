"""Entry point for the maintain stage (compact Iceberg partitions, expire old snapshots).

    python jobs/maintain.py --config conf/cluster.yaml maintain.older_than_hours=24
"""

import sys

from deepcontent.cli import entry

if __name__ == "__main__":
    entry(["maintain", *sys.argv[1:]])
