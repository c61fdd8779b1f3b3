import sys
from pathlib import Path

# Test helpers (agd_reference, fakedata) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))
