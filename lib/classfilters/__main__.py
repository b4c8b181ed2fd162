"""`python -m classfilters`: see cli.py; `python -m classfilters prune ...`: see cli_prune.py."""
import sys

if len(sys.argv) > 1 and sys.argv[1] == "prune":
    from .cli_prune import main as prune_main
    sys.exit(prune_main(sys.argv[2:]))

from .cli import main

sys.exit(main())
