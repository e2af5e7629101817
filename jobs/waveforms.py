"""spark-submit entry point for the waveforms stage.

    spark-submit --master spark://head:7077 jobs/waveforms.py --config conf/cluster.yaml [key=value ...]
"""

import sys

from deepcontent.cli import main

if __name__ == "__main__":
    sys.exit(main(["waveforms", *sys.argv[1:]]))
