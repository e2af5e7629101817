"""spark-submit entry point for the spectrograms stage.

    spark-submit --master spark://head:7077 jobs/spectrograms.py --config conf/cluster.yaml [key=value ...]
"""

import sys

from deepcontent.cli import entry

if __name__ == "__main__":
    entry(["spectrograms", *sys.argv[1:]])
