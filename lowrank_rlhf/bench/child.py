"""`python -m lowrank_rlhf.bench.child ARGS.json`: one layout of a bench run in a process of its own (command.py's
--isolate), so the peak RSS it reports is that layout's alone. ARGS.json holds the parent's flags with --layouts set
to the one layout and --json to where this process writes its report."""

import argparse
import json
import logging
import sys

from .command import run_bench


def main(path: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = argparse.Namespace(**json.loads(open(path).read()))
    args._layout_process = True  # run the layout here, not in yet another child
    run_bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
