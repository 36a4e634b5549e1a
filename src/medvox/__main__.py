import sys

from medvox.cli import main

sys.exit(main())
