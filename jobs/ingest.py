"""spark-submit entry point for the ingest stage.

    spark-submit --master spark://head:7077 jobs/ingest.py --config conf/cluster.yaml [key=value ...]

Thin on purpose: it only hands its arguments to the library's CLI. Under spark-submit the
master and resources come from the submit line; the config supplies storage and warehouse.
"""

import sys

from deepcontent.cli import entry

if __name__ == "__main__":
    entry(["ingest", *sys.argv[1:]])
