import sys

from leanserve.cli import main

sys.exit(main())
