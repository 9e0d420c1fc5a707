"""``python -m finegrain ...`` is the same as the ``finegrain`` command."""

from finegrain.cli.main import main

if __name__ == "__main__":
    main()
