"""Entry point of ``python -m bench.gpu``; spawned warm-up workers import this module too, so it only runs
the command when it is the main program."""

import sys

if __name__ == "__main__":
    from bench.gpu.cli import main

    sys.exit(main())
