"""Run the text encoder: python -m services.text --help."""

from services.plumbing.server import main
from services.plumbing.settings import TEXT
from services.text.servicer import TextApp

if __name__ == "__main__":
    main(TEXT, TextApp)
