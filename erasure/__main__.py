import sys

from erasure.cli.main import main

sys.exit(main())
