"""Launched by tests/test_launch.py: rank 1 raises after init_distributed(), rank 0 exits cleanly.

With torchrun's worker output redirected to files, the exception text can only reach the launcher's failure summary
through the error file that init_distributed() arranges to be written.
"""

import sys

from syncnorm import comm
from syncnorm.launch import init_distributed

if __name__ == "__main__":
    init_distributed(timeout=30)
    if comm.get_rank() == 1:
        raise ValueError(f"deliberate failure on rank 1 ({sys.argv[1]})")
