"""``python -m syncnorm``: the ``syncnorm`` command (see :mod:`syncnorm.cli`)."""

import sys

from syncnorm.cli import main

if __name__ == "__main__":
    sys.exit(main())
