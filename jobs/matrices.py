"""spark-submit entry point for the matrices stage.

    spark-submit --master spark://head:7077 jobs/matrices.py --config conf/cluster.yaml [key=value ...]
"""

import sys

from deepcontent.cli import main

if __name__ == "__main__":
    sys.exit(main(["matrices", *sys.argv[1:]]))
