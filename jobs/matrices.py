"""spark-submit entry point for the matrices stage.

    spark-submit --master spark://head:7077 jobs/matrices.py --config conf/cluster.yaml [key=value ...]
"""

import sys

from deepcontent.cli import entry

if __name__ == "__main__":
    entry(["matrices", *sys.argv[1:]])
