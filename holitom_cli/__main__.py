"""``python -m holitom_cli``: the same as the ``holitom`` command."""

from holitom_cli.cli.app import main

if __name__ == "__main__":
    main()
