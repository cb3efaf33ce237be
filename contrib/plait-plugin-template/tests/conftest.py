"""The template is not installed into the development environment (it would
add its key and its command to every run); its tests import it from this
folder instead. A copy of it, once `pip install -e .` has run, imports the
installed package the same way."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
