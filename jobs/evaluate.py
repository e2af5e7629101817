"""Entry point for the evaluate stage: cold-start metrics per method, transfer accuracy, HTML report.

    python jobs/evaluate.py --config conf/cluster.yaml evaluate.methods='[random,cnn_mse,upper_bound]'
    ray job submit --address http://ray-head:8265 --working-dir . -- python jobs/evaluate.py --config conf/cluster.yaml
"""

import sys

from deepcontent.cli import entry

if __name__ == "__main__":
    entry(["evaluate", *sys.argv[1:]])
