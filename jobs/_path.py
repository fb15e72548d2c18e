"""Make the repository importable when a job runs from a Ray working directory without an install."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
