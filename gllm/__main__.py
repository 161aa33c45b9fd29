import sys

from gllm.cli import main

sys.exit(main())
