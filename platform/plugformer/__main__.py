import sys

from plugformer.cli import main

sys.exit(main())
