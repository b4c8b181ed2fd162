"""`python -m classfilters`: see cli.py; `python -m classfilters prune ...`: see cli_prune.py. Both keep freed
memory in the process (cpu_memory.py): set here, for the process, not by `main`, which tests call in-process."""
import sys

from .cpu_memory import keep_freed_memory

keep_freed_memory()

if len(sys.argv) > 1 and sys.argv[1] == "prune":
    from .cli_prune import main as prune_main
    sys.exit(prune_main(sys.argv[2:]))

from .cli import main

sys.exit(main())
