"""Entry point for the nightly job: ingest -> spectrograms -> embed -> neighbors for new or
changed tracks with the production model, then a run summary under runs/nightly/.

    spark-submit --master spark://head:7077 jobs/nightly.py --config conf/cluster.yaml

Safe to re-run after any failure: a second run publishes nothing.
"""

import sys

from deepcontent.cli import entry

if __name__ == "__main__":
    entry(["nightly", *sys.argv[1:]])
