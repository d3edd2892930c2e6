"""`python -m finetune_core ...`"""

import sys

from finetune_core.cli import main

sys.exit(main())
