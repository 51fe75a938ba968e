"""`python -m relay` is the same as the `relay` console script."""

from relay.ops.cli.main import main

if __name__ == "__main__":
    main()
