"""`python -m selma_toolkit ...` runs the CLI; `accelerate launch -m selma_toolkit ...` needs this."""

from selma_toolkit.cli import main

if __name__ == "__main__":
    main()
