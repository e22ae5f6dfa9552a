import sys

from gradlocate.cli import main

sys.exit(main())
