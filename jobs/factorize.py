"""Entry point for the factorize stage (single node with implicit; spark-submit with
``factorize.backend=spark`` for matrices beyond one machine's memory).

    python jobs/factorize.py --config conf/cluster.yaml factorize.matrix=plays
    spark-submit --master spark://head:7077 jobs/factorize.py --config conf/cluster.yaml factorize.backend=spark
"""

import sys

from deepcontent.cli import entry

if __name__ == "__main__":
    entry(["factorize", *sys.argv[1:]])
