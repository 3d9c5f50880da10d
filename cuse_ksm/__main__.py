import sys

from cuse_ksm.cli import main

sys.exit(main())
