"""``python -m fliqs_compiler.cli`` (what torchrun launches per rank): the ``fliqs`` command."""
from fliqs_compiler.cli.main import main

if __name__ == "__main__":
    main()
