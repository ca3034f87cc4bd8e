"""``python -m lipsdp`` is the ``lipsdp`` command."""

from lipsdp.cli import main

raise SystemExit(main())
