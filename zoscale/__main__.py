import sys

from zoscale.cli import main

sys.exit(main())
