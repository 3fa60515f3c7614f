"""``python -m kvmfw.cli``: the ``kvmfw`` command."""

from kvmfw.entry import main

main()
