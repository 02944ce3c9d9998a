"""``python -m dmdr_cli`` (and therefore ``accelerate launch -m dmdr_cli``)."""

from dmdr_cli.app import main

if __name__ == "__main__":
    main()
