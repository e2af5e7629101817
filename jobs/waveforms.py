"""spark-submit entry point for the waveforms stage.

    spark-submit --master spark://head:7077 jobs/waveforms.py --config conf/cluster.yaml [key=value ...]
"""

import sys

from deepcontent.cli import entry

if __name__ == "__main__":
    entry(["waveforms", *sys.argv[1:]])
