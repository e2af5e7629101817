"""Entry point for the maintain stage (compact Iceberg partitions, expire old snapshots).

    python jobs/maintain.py --config conf/cluster.yaml maintain.older_than_hours=24
"""

import sys

from deepcontent.cli import main

if __name__ == "__main__":
    sys.exit(main(["maintain", *sys.argv[1:]]))
