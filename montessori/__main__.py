import sys

from .cli import main

# vLLM starts its engine core as a spawned process, which imports the main module again.
if __name__ == "__main__":
    sys.exit(main())
