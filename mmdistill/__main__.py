import sys

from mmdistill.cli import main

sys.exit(main())
