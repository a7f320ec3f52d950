import sys

from vlmixer.cli import main

sys.exit(main())
