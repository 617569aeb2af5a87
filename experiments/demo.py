"""`make demo`: a small long-tail rollout, AR vs speculative vs adaptive, as a table.

Runs `effroll bench` with a workload sized for a few minutes on a 2-core CPU.
"""

import argparse
import sys

from effroll.cli import main

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    a = ap.parse_args()
    sys.exit(main(["bench", "--model", a.model, "--prompts", "24", "--max-tokens", "256", "--max-batch", "16",
                   "--k", "4", "--plot", "experiments/demo_timeline.png"], standalone_mode=True))
