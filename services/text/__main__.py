"""Run the text encoder: python -m services.text --help."""

from services.common.server import main
from services.common.settings import TEXT
from services.text.servicer import TextApp

if __name__ == "__main__":
    main(TEXT, TextApp)
