"""``python -m kvmfw.cli``: the ``kvmfw`` command."""

from kvmfw.cli import main

main()
