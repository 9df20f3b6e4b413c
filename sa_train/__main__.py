"""``python -m sa_train``: see :mod:`sa_train.cli`."""

import sys

from sa_train.cli import main

sys.exit(main())
