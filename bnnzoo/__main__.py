"""``python -m bnnzoo``: the command line, as ``torchrun ... -m bnnzoo fit ...`` starts it on every rank."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="bnnzoo")
