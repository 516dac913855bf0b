"""``python -m streammerge`` and ``torchrun -m streammerge``: the command line."""

from .cli import main

main()
